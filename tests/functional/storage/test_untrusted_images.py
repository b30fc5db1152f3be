"""Every bad image is refused, naming the problem, and leaves nothing behind."""
import os
import subprocess
import sys

from vmcloud import exception
from vmcloud.storage import warehouse
from tests import base
from tests.functional.storage import image_factory


class UntrustedImageTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.images = image_factory.ImageFactory(self.tmp)
        self.warehouse = warehouse.Warehouse(self.conf)
        self.store_dir = self.warehouse.backend.root

    def assert_nothing_left(self):
        self.assertEqual([], self.warehouse.images())
        self.assertEqual([], os.listdir(os.path.join(self.store_dir, 'packs')))
        self.assertEqual([], os.listdir(os.path.join(self.store_dir, 'staging')))
        self.assertEqual([], os.listdir(os.path.join(self.store_dir, 'images')))

    def assert_refused(self, path, *fragments, fmt=None, error=exception.UnsafeImage):
        failure = self.assertRaises(error, self.warehouse.import_image, path, 'img', fmt)
        for fragment in fragments:
            self.assertIn(fragment, str(failure))
        self.assert_nothing_left()
        return failure

    # -- backing files -----------------------------------------------------------

    def test_backing_file(self):
        self.assert_refused(self.images.with_backing_file(), 'backing file', 'base.raw')

    def test_json_backing_file(self):
        self.assert_refused(self.images.with_json_backing(), 'backing file', 'json:')

    def test_backing_file_patched_into_header(self):
        # qemu-img would fail on a missing backing file; our message proves the
        # header was read by us first.
        self.assert_refused(self.images.with_patched_backing(),
                            "backing file ('/no/such/backing-file')")

    # -- data files and feature bits ---------------------------------------------

    def test_external_data_file(self):
        self.assert_refused(self.images.with_data_file(), 'external data file')

    def test_data_file_bit_alone(self):
        self.assert_refused(self.images.with_data_file_bit_only(), 'data-file bit')

    def test_unknown_incompatible_feature(self):
        self.assert_refused(self.images.with_incompatible_bit(40, 'unknown.qcow2'),
                            'unknown qcow2 incompatible features 0x10000000000')

    def test_corrupt_bit(self):
        self.assert_refused(self.images.with_incompatible_bit(1, 'corrupt.qcow2'),
                            'marked corrupt')

    def test_encrypted(self):
        self.assert_refused(self.images.encrypted(), 'encrypted')

    # -- formats -------------------------------------------------------------------

    def test_declared_raw_but_qcow2(self):
        self.assert_refused(self.images.qcow2(), 'declared format raw but the file is qcow2',
                            fmt='raw')

    def test_declared_qcow2_but_raw(self):
        self.assert_refused(self.images.raw(), 'declared format qcow2 but the file is raw',
                            fmt='qcow2')

    def test_vmdk_descriptor_naming_another_file(self):
        # Refused from its first bytes: qemu-img never opens the extent.
        self.assert_refused(self.images.vmdk_descriptor(), "unsupported format 'vmdk'")
        self.assert_refused(self.images.vmdk_descriptor(), 'declared format raw but the '
                            'file is vmdk', fmt='raw')

    def test_unsupported_formats(self):
        for fmt in ('vmdk', 'vhdx', 'vdi', 'qed', 'parallels', 'vpc'):
            self.assert_refused(self.images.other_format(fmt), f"unsupported format '{fmt}'")

    def test_unsupported_declared_format(self):
        self.assert_refused(self.images.raw(), "unsupported format 'vmdk'", fmt='vmdk')

    # -- sizes and damage ----------------------------------------------------------

    def test_absurd_virtual_size_from_qemu_img(self):
        self.conf.set_override('max_virtual_size', 1024 ** 3, 'storage')
        self.assert_refused(self.images.qcow2('big.qcow2', '16T'), 'absurd virtual size',
                            str(16 * 1024 ** 4))

    def test_absurd_virtual_size_in_header(self):
        self.assert_refused(self.images.with_size(2 ** 62), 'absurd virtual size',
                            str(2 ** 62))

    def test_raw_larger_than_the_limit(self):
        self.conf.set_override('max_virtual_size', 512 * 1024, 'storage')
        self.assert_refused(self.images.raw(), 'absurd virtual size')

    def test_truncated_header(self):
        self.assert_refused(self.images.truncated(), 'truncated qcow2 header')

    def test_l1_table_past_end_of_file(self):
        self.assert_refused(self.images.with_l1_past_end(), 'qemu-img')

    def test_missing_file(self):
        self.assert_refused(os.path.join(self.tmp, 'nothing.raw'), 'nothing.raw',
                            'does not exist', error=exception.ImageFileNotFound)

    def test_directory(self):
        self.assert_refused(self.tmp, 'not a regular file')

    # -- qemu-img runs confined ------------------------------------------------------

    def test_qemu_img_runs_under_prlimit(self):
        # 16 MiB of address space is too little for qemu-img to even start:
        # the limit is really applied, and the failure is reported cleanly.
        self.conf.set_override('qemu_img_address_space', 16 * 1024 ** 2, 'storage')
        self.assert_refused(self.images.qcow2_from_raw(), 'qemu-img')

    def test_default_limits_allow_real_images(self):
        for name, path in (('raw', self.images.raw()), ('qcow2', self.images.qcow2_from_raw())):
            manifest = self.warehouse.import_image(path, name).manifest
            raw = path if name == 'raw' else path + '.src'
            with open(raw, 'rb') as f:
                self.assertBytesEqual(f.read(), self.warehouse.read(manifest, 0, manifest.size))

    # -- the command line -----------------------------------------------------------

    def test_cli_refusals(self):
        config = self.write_config()
        for path, fragment in ((self.images.with_json_backing(), b'json:'),
                               (self.images.with_data_file(), b'external data file')):
            result = subprocess.run(
                [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config,
                 'image', 'import', path, 'img'], capture_output=True, timeout=60)
            self.assertEqual(1, result.returncode)
            self.assertIn(b'vmcloud: error: refusing image', result.stderr)
            self.assertIn(fragment, result.stderr)
            self.assert_nothing_left()
