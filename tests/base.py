"""Test bases shared by unit and functional tests."""
import os
import random
import subprocess
import time
import uuid

import fixtures
import testtools
from oslo_config import fixture as config_fixture

import vmcloud.conf


# Clouds of concurrent tests in the machine's network namespace each take VNIs from a
# slot of their own: a network's bridge is vmcb<vni>, one name per namespace.
VNI_SLOT = 1000
VNI_SLOTS = range(10000, 990000, VNI_SLOT)


def stop_process(process: subprocess.Popen, timeout: float = 60) -> None:
    """Stop a service a test started: SIGTERM, ``timeout`` seconds, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def postgres_database(add_cleanup, prefix: str) -> str:
    """The URL of a new empty PostgreSQL database owned by vmcloud, named ``prefix`` and
    a random tag, dropped by the cleanup it gives ``add_cleanup`` (a test's addCleanup or
    a class's addClassCleanup). tools/start-services.sh runs PostgreSQL; creating a
    database needs root.

    It is copied from template0, which takes no connections: CREATE DATABASE refuses a
    template that another session is connected to, and template1, createdb's default, is
    the database anything on the machine falls back to. A refusal is tried again a few
    times; the last one's error carries what createdb printed."""
    database = f'{prefix}_{uuid.uuid4().hex[:12]}'
    for attempt in range(5):
        try:
            postgres_admin(f'createdb -T template0 -O vmcloud {database}')
            break
        except RuntimeError:
            if attempt == 4:
                raise
            time.sleep(1)
    add_cleanup(postgres_admin, f'dropdb --force {database}')
    return f'postgresql+psycopg://vmcloud:vmcloud@127.0.0.1/{database}'


def postgres_admin(command: str) -> None:
    """Run ``command`` as the postgres user.

    :raises RuntimeError: it failed; the message holds what it printed on stderr.
    """
    result = subprocess.run(('su', 'postgres', '-c', command), capture_output=True,
                            text=True, timeout=60)
    if result.returncode:
        raise RuntimeError(f'{command!r} exited with {result.returncode}: '
                           f'{result.stderr.strip()}')


class TestCase(testtools.TestCase):
    """A test with a private configuration and a private state directory."""

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(vmcloud.conf.CONF)).conf
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.state_path = os.path.join(self.tmp, 'state')
        self.conf.set_override('state_path', self.state_path)

    def use_private_vni_range(self) -> dict[str, int]:
        """Give this test's clouds a VNI range of their own (``[network] vni_min`` and
        ``vni_max``, also returned for a config file): a test running a cloud with the
        Linux network agent in the machine's namespace would otherwise build the same
        bridge names (vmcb1000, ...) as another test worker's cloud. Two tests share a
        slot with a chance of 1 in 980; their second plug is then refused (another
        agent's bridge), never silently shared."""
        low = random.choice(VNI_SLOTS)
        values = {'vni_min': low, 'vni_max': low + VNI_SLOT - 1}
        for key, value in values.items():
            self.conf.set_override(key, value, 'network')
        return values

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
