"""Inspection of untrusted image files before anything else opens them.

The qcow2 header is parsed here, in Python, before qemu-img runs at all: a
backing file or an external data file would make qemu-img itself open another
file of the attacker's choosing. Only then is qemu-img (under resource limits)
asked to confirm the format and check the image's metadata.
"""
import dataclasses
import os
import stat
import struct

from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import qemu_img

SUPPORTED_FORMATS = ('raw', 'qcow2')

QCOW2_MAGIC = b'QFI\xfb'
# Incompatible-feature bits qemu defines: dirty, corrupt, external data file,
# compression type, extended L2. Any other bit means "don't open me unless
# you understand me".
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_INCOMPAT_KNOWN = 0x1f
_HEADER_READ = 4096


# Formats recognised by their first bytes, so that qemu-img never gets to
# open them: several (vmdk extents, qed backing files) name other files.
_MAGICS = (
    (b'KDMV', 'vmdk'), (b'COWD', 'vmdk'), (b'vhdxfile', 'vhdx'), (b'QED\x00', 'qed'),
    (b'LUKS\xba\xbe', 'luks'), (b'conectix', 'vpc'), (b'WithoutFreeSpace', 'parallels'),
    (b'WithouFreSpacExt', 'parallels'), (b'Bochs Virtual HD Image', 'bochs'),
    (b'#!/bin/sh\n#V2.0 Format', 'cloop'),
)
_VDI_SIGNATURE = b'\x7f\x10\xda\xbe'


def _is_vmdk_descriptor(header: bytes) -> bool:
    """A text descriptor: comment and blank lines, then ``version=`` (as qemu probes it)."""
    for line in header.split(b'\n'):
        stripped = line.strip(b' \r')
        if stripped.startswith(b'#') or not stripped:
            continue
        return stripped.startswith(b'version=')
    return False


def detect_format(header: bytes) -> str:
    """The format of an image from its first bytes; 'raw' if nothing else matches."""
    if header.startswith(QCOW2_MAGIC):
        return 'qcow2'
    for magic, name in _MAGICS:
        if header.startswith(magic):
            return name
    if header[0x40:0x44] == _VDI_SIGNATURE:
        return 'vdi'
    if _is_vmdk_descriptor(header):
        return 'vmdk'
    return 'raw'


@dataclasses.dataclass(frozen=True)
class InspectedImage:
    path: str
    format: str
    virtual_size: int


def _refuse(path: str, problem: str) -> exception.UnsafeImage:
    return exception.UnsafeImage(f'refusing image {path}: {problem}')


def _unsupported(path: str, fmt: str) -> exception.UnsafeImage:
    return _refuse(path, f'unsupported format {fmt!r} (supported: {", ".join(SUPPORTED_FORMATS)})')


def _check_qcow2_header(path: str, header: bytes, max_size: int) -> None:
    if len(header) < 72:
        raise _refuse(path, 'truncated qcow2 header')
    (version, backing_offset, backing_size, cluster_bits, size,
     crypt_method) = struct.unpack_from('>IQIIQI', header, 4)
    if version not in (2, 3):
        raise _refuse(path, f'unsupported qcow2 version {version}')
    if backing_offset:
        name = header[backing_offset:backing_offset + backing_size]
        raise _refuse(path, f'it has a backing file ({name.decode("utf-8", "replace")!r}); '
                            'only self-contained images are accepted')
    if not 9 <= cluster_bits <= 21:
        raise _refuse(path, f'invalid qcow2 cluster size 2^{cluster_bits}')
    if crypt_method:
        raise _refuse(path, 'it is encrypted')
    if size > max_size:
        raise _refuse(path, f'absurd virtual size {size} bytes (limit {max_size})')
    if version == 3:
        if len(header) < 104:
            raise _refuse(path, 'truncated qcow2 v3 header')
        (incompatible,) = struct.unpack_from('>Q', header, 72)
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            raise _refuse(path, 'it uses an external data file (qcow2 data-file bit)')
        if incompatible & _QCOW2_INCOMPAT_CORRUPT:
            raise _refuse(path, 'it is marked corrupt')
        unknown = incompatible & ~_QCOW2_INCOMPAT_KNOWN
        if unknown:
            raise _refuse(path, f'unknown qcow2 incompatible features 0x{unknown:x}')


def inspect(conf: cfg.ConfigOpts, path: str, declared_format: str | None = None) -> InspectedImage:
    """Decide whether ``path`` is safe to import, and as what.

    :raises: ImageFileNotFound if ``path`` does not exist.
    :raises: UnsafeImage naming the problem: not a regular file, an unsupported
        format, a declared format that differs from the detected one, a backing
        file, an external data file, unknown incompatible features, encryption,
        corruption, an empty file or an absurd or zero virtual size.
    """
    if declared_format is not None and declared_format not in SUPPORTED_FORMATS:
        raise _unsupported(path, declared_format)
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise exception.ImageFileNotFound(path) from exc
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(path, 'not a regular file')
    if st.st_size == 0:
        raise _refuse(path, 'it is empty (0 bytes)')
    max_size = conf.storage.max_virtual_size
    with open(path, 'rb') as f:
        header = f.read(_HEADER_READ)
    detected = detect_format(header)
    if declared_format is not None and detected != declared_format:
        raise _refuse(path, f'declared format {declared_format} but the file is {detected}')
    if detected not in SUPPORTED_FORMATS:
        raise _unsupported(path, detected)
    if detected == 'qcow2':
        _check_qcow2_header(path, header, max_size)

    # Only now is the file safe for qemu-img to open. It probes the format
    # again, a second opinion on formats the magic table above does not know.
    try:
        probed = qemu_img.info(conf, path)
    except exception.StorageError as exc:
        raise _refuse(path, f'qemu-img cannot read it: {exc}') from exc
    if probed.get('format') != detected:
        raise _refuse(path, f"qemu-img detects format {probed.get('format')!r}, not {detected}")
    if 'backing-filename' in probed or 'full-backing-filename' in probed:
        raise _refuse(path, f"it has a backing file ({probed.get('backing-filename')!r})")
    specific = probed.get('format-specific', {}).get('data', {})
    if 'data-file' in specific:
        raise _refuse(path, f"it uses an external data file ({specific['data-file']!r})")
    # qemu rounds a raw file's size up to whole sectors; we read the file itself.
    virtual_size = st.st_size if detected == 'raw' else int(probed['virtual-size'])
    if virtual_size > max_size:
        raise _refuse(path, f'absurd virtual size {virtual_size} bytes (limit {max_size})')
    if virtual_size == 0:
        raise _refuse(path, 'its virtual size is 0 bytes')

    if detected == 'qcow2':
        report = qemu_img.check(conf, path, 'qcow2')
        if report.get('corruptions') or report.get('check-errors'):
            raise _refuse(path, f"qemu-img check found {report.get('corruptions', 0)} "
                                f"corruptions and {report.get('check-errors', 0)} errors")
    return InspectedImage(path=path, format=detected, virtual_size=virtual_size)
