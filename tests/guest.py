"""The test guest built by tools/guest/build-test-guest.sh."""
import os
import re
import secrets
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


def spec(name: str, disk: str, disk_format: str = 'qcow2', nics: tuple[base.Nic, ...] = (),
         **flags: str) -> base.InstanceSpec:
    """An instance of the test guest; ``flags`` become ``vmcloud.KEY=VALUE`` on its cmdline."""
    cmdline = ' '.join([CMDLINE, f'vmcloud.id={name}']
                       + [f'vmcloud.{k}={v}' for k, v in flags.items()])
    return base.InstanceSpec(name=name, disk=disk, disk_format=disk_format,
                             kernel=path('vmlinuz'), initrd=path('initrd.img'), cmdline=cmdline,
                             nics=nics)


# -- isolated test bridges ------------------------------------------------------------
# A test bridge lives in the host's namespace, where the drivers make their taps (and
# libvirtd runs), and is isolated by what it lacks: no address of the host's (IPv6 off
# too), no uplink, no route; only the test's guests' taps are ports of it, so their
# traffic stays between them. Its name carries the creating process's pid (hex), so
# sweep_stale_bridges() removes those of a test run that was killed.
BRIDGE_PREFIX = 'vtbr'
_BRIDGE = re.compile(rf'^{BRIDGE_PREFIX}([0-9a-f]{{6}})[0-9a-f]{{4}}$')
_IP_TIMEOUT = 30


def _ip(*argv: str) -> None:
    subprocess.run(['ip', *argv], check=True, capture_output=True, timeout=_IP_TIMEOUT)


def link_exists(device: str) -> bool:
    return os.path.exists(f'/sys/class/net/{device}')


def remove_bridge(bridge: str) -> None:
    """Remove a test bridge (its ports are left unenslaved, not removed); no error if gone."""
    if link_exists(bridge):
        subprocess.run(['ip', 'link', 'delete', 'dev', bridge], capture_output=True,
                       timeout=_IP_TIMEOUT)


def remove_taps(instance: str) -> None:
    """Remove every tap the drivers may have made for ``instance``; no error if none."""
    for index in range(base.MAX_NICS):
        tap = base.tap_name(instance, index)
        if link_exists(tap):
            subprocess.run(['ip', 'link', 'delete', 'dev', tap], capture_output=True,
                           timeout=_IP_TIMEOUT)


def sweep_stale_bridges() -> list[str]:
    """Remove the test bridges whose creating process is dead; the names removed."""
    swept = []
    for device in os.listdir('/sys/class/net'):
        match = _BRIDGE.match(device)
        if match and not os.path.exists(f'/proc/{int(match.group(1), 16)}'):
            remove_bridge(device)
            swept.append(device)
    return swept


def make_bridge(test, mtu: int = 1500) -> str:
    """An isolated Linux bridge (see above), up, removed when ``test`` ends (also on
    failure; the cleanup is registered before the bridge is made). Needs root."""
    sweep_stale_bridges()
    bridge = f'{BRIDGE_PREFIX}{os.getpid():06x}{secrets.token_hex(2)}'
    test.addCleanup(remove_bridge, bridge)
    # stp off and no forward delay: a port forwards as soon as it is up
    _ip('link', 'add', 'name', bridge, 'mtu', str(mtu), 'type', 'bridge',
        'stp_state', '0', 'forward_delay', '0')
    disable_ipv6 = f'/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6'
    if os.path.exists(disable_ipv6):
        with open(disable_ipv6, 'w') as f:
            f.write('1')
    _ip('link', 'set', 'dev', bridge, 'up')
    return bridge


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
