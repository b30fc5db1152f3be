import os
import subprocess
import sys

from tests import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
SAMPLE = os.path.join(REPO, 'etc', 'vmcloud', 'vmcloud.conf.sample')


class ConfigSampleTest(base.TestCase):
    def test_sample_is_current(self):
        """etc/vmcloud/vmcloud.conf.sample is what `tox -e genconfig` writes today."""
        generated = os.path.join(self.tmp, 'vmcloud.conf.sample')
        generator = os.path.join(os.path.dirname(sys.executable), 'oslo-config-generator')
        subprocess.run([generator, '--config-file',
                        os.path.join(REPO, 'etc', 'vmcloud', 'vmcloud-config-generator.conf'),
                        '--output-file', generated], check=True, cwd=REPO)
        with open(SAMPLE) as committed, open(generated) as fresh:
            self.assertEqual(committed.read(), fresh.read(),
                             'run `tox -e genconfig` and commit the sample')
