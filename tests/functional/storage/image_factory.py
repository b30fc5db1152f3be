"""Bad images, built with qemu-img and header patches, the way an attacker would."""
import os
import struct
import subprocess

# qcow2 header fields (big-endian): see docs/interop/qcow2.txt in QEMU.
BACKING_FILE_OFFSET = 8     # u64
BACKING_FILE_SIZE = 16      # u32
SIZE = 24                   # u64
CRYPT_METHOD = 32           # u32
INCOMPATIBLE_FEATURES = 72  # u64


def qemu_img(*args: str) -> None:
    subprocess.run(['qemu-img', *args], check=True, capture_output=True)


def patch(path: str, offset: int, fmt: str, value) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def read_field(path: str, offset: int, fmt: str):
    with open(path, 'rb') as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


class ImageFactory:
    def __init__(self, directory: str):
        self.directory = directory

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def raw(self, name: str = 'good.raw', size: int = 1024 * 1024) -> str:
        path = self.path(name)
        with open(path, 'wb') as f:
            f.write(os.urandom(size // 2))
            f.truncate(size)
        return path

    def qcow2(self, name: str = 'good.qcow2', size: str = '1M', *options: str) -> str:
        path = self.path(name)
        qemu_img('create', '-f', 'qcow2', *options, path, size)
        return path

    def qcow2_from_raw(self, name: str = 'good.qcow2') -> str:
        path = self.path(name)
        qemu_img('convert', '-f', 'raw', '-O', 'qcow2', self.raw(name + '.src'), path)
        return path

    def with_backing_file(self) -> str:
        base = self.raw('base.raw')
        return self.qcow2('backed.qcow2', '1M', '-b', base, '-F', 'raw')

    def with_json_backing(self) -> str:
        return self.qcow2('json.qcow2', '1M', '-u', '-F', 'raw', '-b',
                          'json:{"driver":"file","filename":"/etc/shadow"}')

    def with_patched_backing(self) -> str:
        """A backing file name written into the header by hand, past the header fields."""
        path = self.qcow2('patched-backing.qcow2')
        name = b'/no/such/backing-file'
        offset = 1024  # inside the first cluster, after the header extensions
        with open(path, 'r+b') as f:
            f.seek(offset)
            f.write(name)
        patch(path, BACKING_FILE_OFFSET, '>Q', offset)
        patch(path, BACKING_FILE_SIZE, '>I', len(name))
        return path

    def with_data_file(self) -> str:
        return self.qcow2('data-file.qcow2', '1M', '-o',
                          f'data_file={self.path("no-such-data-file.raw")}')

    def with_data_file_bit_only(self) -> str:
        path = self.qcow2('data-bit.qcow2')
        patch(path, INCOMPATIBLE_FEATURES, '>Q',
              read_field(path, INCOMPATIBLE_FEATURES, '>Q') | 1 << 2)
        return path

    def with_incompatible_bit(self, bit: int, name: str) -> str:
        path = self.qcow2(name)
        patch(path, INCOMPATIBLE_FEATURES, '>Q',
              read_field(path, INCOMPATIBLE_FEATURES, '>Q') | 1 << bit)
        return path

    def encrypted(self) -> str:
        path = self.qcow2('encrypted.qcow2')
        patch(path, CRYPT_METHOD, '>I', 1)
        return path

    def with_size(self, size: int) -> str:
        path = self.qcow2('huge-patched.qcow2')
        patch(path, SIZE, '>Q', size)
        return path

    def truncated(self) -> str:
        path = self.qcow2('truncated.qcow2')
        os.truncate(path, 50)
        return path

    def with_l1_past_end(self) -> str:
        path = self.qcow2_from_raw('bad-l1.qcow2')
        patch(path, 40, '>Q', 1 << 40)  # l1_table_offset
        return path

    def vmdk_descriptor(self, extent: str = '/etc/shadow') -> str:
        """A text vmdk whose extent is a file of the attacker's choosing."""
        path = self.path('descriptor.vmdk')
        with open(path, 'w') as f:
            f.write('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\n'
                    f'RW 2048 FLAT "{extent}" 0\n')
        return path

    def other_format(self, fmt: str) -> str:
        path = self.path(f'image.{fmt}')
        qemu_img('create', '-f', fmt, path, '1M')
        return path
