"""``vmcloud mirror serve`` refuses bad input by name and leaves nothing behind."""
import os
import subprocess
import sys

from tests import base


class MirrorCliTest(base.TestCase):
    def serve(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.write_config(),
             'mirror', 'serve', *args], capture_output=True, text=True, timeout=60)

    def test_bad_input(self):
        for args, message in ((('vm1', '--image', 'nosuch'), 'image nosuch not found'),
                              (('vm1',), 'mirror vm1 not found'),
                              (('a/b', '--image', 'x'), "invalid mirror name 'a/b'")):
            result = self.serve(*args)
            self.assertEqual(1, result.returncode, result.stderr)
            self.assertIn(message, result.stderr)
            self.assertEqual('', result.stdout)
        mirrors = os.path.join(self.state_path, 'mirrors')
        self.assertEqual([], os.listdir(mirrors) if os.path.exists(mirrors) else [])
