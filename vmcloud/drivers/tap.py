"""Tap devices of instance NICs, for a driver whose hypervisor does not make them.

The qemu driver makes each tap before qemu starts (qemu then only opens it, so it
needs no privilege of its own and no helper script), and removes it itself: a tap
made with ``ip tuntap add`` is persistent and outlives its qemu. The tap is a
port of the NIC's bridge with the bridge's MTU (a frame larger than a port's MTU
is dropped by the bridge, and the network agent's bridges are smaller than 1500
to leave room for VXLAN), and carries no address of the host's: the host takes no
part in the guests' network.
"""
import os
import subprocess
from typing import Sequence

from vmcloud import exception

# One ip command; it returns in milliseconds unless the kernel is stuck.
COMMAND_TIMEOUT = 30.0


def _ip(argv: Sequence[str]) -> None:
    """Run ``ip ARGV``.

    :raises: DriverError naming the command and what it printed, if it fails or hangs.
    """
    command = ['ip', *argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise exception.DriverError(f'{" ".join(command)}: {exc}') from exc
    if done.returncode != 0:
        raise exception.DriverError(f'{" ".join(command)} failed: '
                                    f'{done.stderr.strip() or done.stdout.strip()}')


def exists(device: str) -> bool:
    return os.path.exists(f'/sys/class/net/{device}')


def mtu(device: str) -> int:
    """The MTU of ``device``. :raises: DriverError if it does not exist."""
    try:
        with open(f'/sys/class/net/{device}/mtu') as f:
            return int(f.read())
    except (OSError, ValueError) as exc:
        raise exception.DriverError(f'cannot read the MTU of {device}: {exc}') from exc


def create(tap: str, bridge: str) -> None:
    """Make ``tap`` a port of ``bridge`` with its MTU, up; one of that name is replaced.

    A tap of that name can only be a dead instance's (the name is the instance's):
    one left by a driver that crashed before it could remove it.

    :raises: DriverError naming the command that failed; then no tap ``tap`` is left.
    """
    delete(tap)
    try:
        size = mtu(bridge)
        _ip(['tuntap', 'add', 'dev', tap, 'mode', 'tap'])
        _disable_ipv6(tap)
        _ip(['link', 'set', 'dev', tap, 'mtu', str(size), 'master', bridge, 'up'])
    except BaseException:
        try:
            delete(tap)
        except exception.DriverError:
            pass    # the first error says more; a later delete retries
        raise


def _disable_ipv6(tap: str) -> None:
    # Without this the kernel gives the tap a link-local address once it is up.
    path = f'/proc/sys/net/ipv6/conf/{tap}/disable_ipv6'
    if os.path.exists(path):    # absent when IPv6 is off on this host
        try:
            with open(path, 'w') as f:
                f.write('1')
        except OSError as exc:
            raise exception.DriverError(f'cannot turn IPv6 off on {tap}: {exc}') from exc


def delete(tap: str) -> None:
    """Remove ``tap`` if it exists. :raises: DriverError if it exists and stays."""
    if not exists(tap):
        return
    try:
        _ip(['link', 'delete', 'dev', tap])
    except exception.DriverError:
        if exists(tap):
            raise       # else someone removed it meanwhile: the outcome asked for
