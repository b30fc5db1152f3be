"""Test bases shared by unit and functional tests."""
import os
import subprocess

import fixtures
import testtools
from oslo_config import fixture as config_fixture

import vmcloud.conf


def stop_process(process: subprocess.Popen, timeout: float = 60) -> None:
    """Stop a service a test started: SIGTERM, ``timeout`` seconds, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class TestCase(testtools.TestCase):
    """A test with a private configuration and a private state directory."""

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(vmcloud.conf.CONF)).conf
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.state_path = os.path.join(self.tmp, 'state')
        self.conf.set_override('state_path', self.state_path)

    def assertBytesEqual(self, expected: bytes, actual: bytes) -> None:
        """Compare large byte strings without dumping them into the failure message."""
        if expected == actual:
            return
        first = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b),
                     min(len(expected), len(actual)))
        self.fail(f'bytes differ: lengths {len(expected)} vs {len(actual)}, '
                  f'first difference at offset {first}')

    def assert_one_line_error(self, result, *fragments: bytes) -> None:
        """A finished ``vmcloud`` command (subprocess.CompletedProcess) failed with one
        line on stderr, ``vmcloud: error: ...``, holding every fragment."""
        self.assertEqual(1, result.returncode, result.stderr)
        self.assertEqual(1, len(result.stderr.splitlines()), result.stderr)
        self.assertTrue(result.stderr.startswith(b'vmcloud: error: '), result.stderr)
        for fragment in fragments:
            self.assertIn(fragment, result.stderr)

    def write_config(self, **sections) -> str:
        """A config file for a child process: write_config(DEFAULT={'state_path': ...})."""
        path = os.path.join(self.tmp, 'vmcloud.conf')
        sections.setdefault('DEFAULT', {}).setdefault('state_path', self.state_path)
        with open(path, 'w') as f:
            for section, options in sections.items():
                f.write(f'[{section}]\n')
                for key, value in options.items():
                    f.write(f'{key} = {value}\n')
        return path
