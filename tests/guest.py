"""The test guest built by tools/guest/build-test-guest.sh."""
import os
import subprocess
import uuid

from vmcloud.drivers import base

# no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
# fail and panic the guest ("IO-APIC + timer doesn't work!").
CMDLINE = 'console=ttyS0 quiet no_timer_check'

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_DIR = os.environ.get('VMCLOUD_GUEST_DIR', os.path.join(REPO, '.cache', 'guest'))


def path(leaf: str) -> str:
    result = os.path.join(GUEST_DIR, leaf)
    if not os.path.exists(os.path.join(GUEST_DIR, 'ready')):
        raise AssertionError(f'no test guest in {GUEST_DIR}: run tools/guest/build-test-guest.sh')
    return result


def unique_name(prefix: str) -> str:
    return f'{prefix}-{uuid.uuid4().hex[:8]}'


def overlay(directory: str, name: str) -> str:
    """A qcow2 overlay over the guest's disk, so each instance writes its own."""
    disk = os.path.join(directory, f'{name}.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b', path('disk.img'),
                    '-F', 'raw', disk], check=True)
    return disk


def spec(name: str, disk: str, disk_format: str = 'qcow2', **flags: str) -> base.InstanceSpec:
    """An instance of the test guest; ``flags`` become ``vmcloud.KEY=VALUE`` on its cmdline."""
    cmdline = ' '.join([CMDLINE, f'vmcloud.id={name}']
                       + [f'vmcloud.{k}={v}' for k, v in flags.items()])
    return base.InstanceSpec(name=name, disk=disk, disk_format=disk_format,
                             kernel=path('vmlinuz'), initrd=path('initrd.img'), cmdline=cmdline)


def read_guest_file(disk: str, guest_path: str) -> str:
    """A file from the ext4 disk the guest used (through qemu-img and debugfs, no mount)."""
    raw = disk + '.raw'
    subprocess.run(['qemu-img', 'convert', '-O', 'raw', disk, raw], check=True)
    try:
        result = subprocess.run(['/sbin/debugfs', '-R', f'cat {guest_path}', raw],
                                capture_output=True, text=True, check=True)
        return result.stdout
    finally:
        os.unlink(raw)


def qemu_processes_named(name: str) -> list[int]:
    """PIDs of qemu processes running an instance called ``name`` (any driver)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                args = f.read().split(b'\0')
        except OSError:
            continue
        if args and b'qemu-system' in args[0] and any(name.encode() in a for a in args):
            pids.append(int(pid))
    return pids


def realistic_disk() -> str:
    """The realistic guest's root filesystem (tools/guest/build-realistic-guest.sh)."""
    disk = os.path.join(GUEST_DIR, 'realistic', 'root.img')
    if not os.path.exists(os.path.join(GUEST_DIR, 'realistic', 'ready')):
        raise AssertionError(f'no realistic guest in {GUEST_DIR}: '
                             'run tools/guest/build-realistic-guest.sh')
    return disk


def realistic_spec(name: str, disk: str, disk_format: str = 'qcow2',
                   memory_mib: int = 512) -> base.InstanceSpec:
    """An instance of the realistic guest: systemd on a Debian root filesystem."""
    with open(os.path.join(GUEST_DIR, 'realistic', 'cmdline')) as f:
        cmdline = f.read().strip()
    return base.InstanceSpec(name=name, disk=disk, disk_format=disk_format,
                             memory_mib=memory_mib, kernel=path('vmlinuz'),
                             initrd=path('initrd.img'), cmdline=cmdline)
