"""The guests themselves (tools/guest/): networking, HTTP, reach probes, streams.

Each guest is a qemu-system-x86_64 process started here under TCG, not through a driver,
so these tests hold whatever the drivers' NIC support does. Networks need no root and
send nothing off the machine: QEMU's user-mode network (``restrict=on``, its built-in
DHCP server hands out 10.0.2.15, a hostfwd on 127.0.0.1 reaches the guest's port 80), or
two guests joined by a UDP socket netdev on 127.0.0.1.
"""
import http.client
import os
import re
import socket
import subprocess
import time

from tests import base
from tests import guest

BOOT_TIMEOUT = 120
# systemd on TCG, from a 2 GiB root filesystem, on a shared host
REALISTIC_TIMEOUT = 240
SLIRP_ADDRESS = '10.0.2.15/24'


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def http_get(port: int, timeout: float = 5) -> tuple[int, bytes]:
    """GET / through a hostfwd on 127.0.0.1. :raises: OSError, http.client.HTTPException"""
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        connection.request('GET', '/')
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Guest:
    """One qemu process; its serial console is a file the test reads."""

    def __init__(self, test: base.TestCase, name: str, netdev: list[str], mac: str,
                 cmdline: str, kernel: str, initrd: str, disk: str, memory_mib: int = 256):
        self.name = name
        self.console = os.path.join(test.tmp, f'{name}.console')
        self.stderr = os.path.join(test.tmp, f'{name}.stderr')
        command = ['qemu-system-x86_64', '-name', name, '-machine', 'pc,accel=tcg',
                   '-nodefaults', '-no-user-config', '-display', 'none',
                   '-m', str(memory_mib), '-serial', f'file:{self.console}',
                   '-kernel', kernel, '-initrd', initrd, '-append', cmdline,
                   # snapshot=on: the guest's writes go to a temporary file qemu deletes
                   '-drive', f'file={disk},format=raw,if=virtio,snapshot=on']
        if netdev:
            command += ['-netdev', ','.join(netdev[:1] + ['id=n0'] + netdev[1:]),
                        '-device', f'virtio-net-pci,netdev=n0,mac={mac}']
        with open(self.stderr, 'wb') as err:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=err)
        test.addCleanup(self.stop)

    @classmethod
    def test_guest(cls, test, name: str, netdev: list[str], mac: str = '52:54:00:12:34:01',
                   **flags: str) -> 'Guest':
        cmdline = ' '.join([guest.CMDLINE, f'vmcloud.id={name}']
                           + [f'vmcloud.{k}={v}' for k, v in flags.items()])
        return cls(test, name, netdev, mac, cmdline, guest.path('vmlinuz'),
                   guest.path('initrd.img'), guest.path('disk.img'))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def output(self) -> str:
        try:
            with open(self.console, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match:
        """The first console line matching ``pattern``.
        :raises: AssertionError on timeout or when qemu exits first, with the console"""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output(), re.MULTILINE)
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                with open(self.stderr, errors='replace') as f:
                    qemu = f.read()
                state = ('still running' if self.process.poll() is None
                         else f'exited {self.process.returncode}')
                raise AssertionError(
                    f'{self.name}: no console line matching {pattern!r} (qemu {state})'
                    f'\nconsole:\n{self.output()}\nqemu stderr:\n{qemu}')
            time.sleep(0.2)


def slirp(http_port: int, guest_port: int = 80) -> list[str]:
    return ['user', 'restrict=on', f'hostfwd=tcp:127.0.0.1:{http_port}-:{guest_port}']


def first_answer(port: int, timeout: float) -> tuple[int, bytes]:
    """The first HTTP answer through a hostfwd, retrying while the guest boots."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(port)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f'no HTTP answer on 127.0.0.1:{port} in {timeout} s: {e}')
            time.sleep(1)


class TestTestGuestNetwork(base.TestCase):

    def test_dhcp_then_counting_http(self):
        port = free_port()
        g = Guest.test_guest(self, 'dhcp-guest', slirp(port))
        g.wait_for(r'^VMCLOUD-PHASE boot-done')
        out = g.output()
        # the NIC is configured before boot-done, by DHCP
        self.assertIn(f'VMCLOUD-NET eth0 {SLIRP_ADDRESS}\n', out)
        self.assertLess(out.index('VMCLOUD-NET eth0'), out.index('VMCLOUD-PHASE boot-done'))
        answers = [http_get(port) for _ in range(3)]
        self.assertEqual([(200, b'dhcp-guest 1\n'), (200, b'dhcp-guest 2\n'),
                          (200, b'dhcp-guest 3\n')], answers)
        # the other markers still come
        g.wait_for(r'^VMCLOUD-TICK 2$')
        self.assertIn('VMCLOUD-PHASE app-running', g.output())

    def test_http_off_answers_nothing(self):
        port = free_port()
        g = Guest.test_guest(self, 'quiet-guest', slirp(port), http='0')
        g.wait_for(r'^VMCLOUD-PHASE boot-done')
        self.assertIn(f'VMCLOUD-NET eth0 {SLIRP_ADDRESS}\n', g.output())
        # slirp accepts on the host side, then the guest refuses: no HTTP answer
        self.assertRaises((OSError, http.client.HTTPException), http_get, port)

    def test_no_markers_other_http_port(self):
        port = free_port()
        g = Guest.test_guest(self, 'plain-guest', slirp(port, 8080), markers='0',
                             http_port='8080')
        # TICK comes after the point where app-running would be printed
        g.wait_for(r'^VMCLOUD-TICK 2$')
        self.assertEqual((200, b'plain-guest 1\n'), http_get(port))
        self.assertNotIn('VMCLOUD-PHASE', g.output())
        self.assertIn(f'VMCLOUD-NET eth0 {SLIRP_ADDRESS}\n', g.output())

    def test_no_dhcp_server(self):
        # a UDP socket netdev towards a port nobody listens on: a link, no DHCP server
        g = Guest.test_guest(self, 'lonely-guest', [
            'socket', f'udp=127.0.0.1:{free_port(socket.SOCK_DGRAM)}',
            f'localaddr=127.0.0.1:{free_port(socket.SOCK_DGRAM)}'])
        g.wait_for(r'^VMCLOUD-PHASE boot-done')
        out = g.output()
        self.assertIn('VMCLOUD-NET-FAILED no DHCP lease on eth0\n', out)
        self.assertLess(out.index('VMCLOUD-NET-FAILED'), out.index('VMCLOUD-PHASE boot-done'))

    def test_no_nic(self):
        g = Guest.test_guest(self, 'nicless-guest', [])
        g.wait_for(r'^VMCLOUD-PHASE app-running')
        self.assertNotIn('VMCLOUD-NET', g.output())

    def test_reach_and_stream_between_two_guests(self):
        a_port, b_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
        a = Guest.test_guest(self, 'guest-a', [
            'socket', f'udp=127.0.0.1:{b_port}', f'localaddr=127.0.0.1:{a_port}'],
            mac='52:54:00:12:34:0a', ip='10.9.0.1/24', stream_server='5000')
        b = Guest.test_guest(self, 'guest-b', [
            'socket', f'udp=127.0.0.1:{a_port}', f'localaddr=127.0.0.1:{b_port}'],
            mac='52:54:00:12:34:0b', ip='10.9.0.2/24', reach='10.9.0.1,10.9.0.3:80',
            reach_tries='5', stream_to='10.9.0.1:5000:1000')
        a.wait_for(r'^VMCLOUD-NET eth0 10\.9\.0\.1/24$')
        b.wait_for(r'^VMCLOUD-NET eth0 10\.9\.0\.2/24$')
        b.wait_for(r'^VMCLOUD-REACH 10\.9\.0\.1:80 yes guest-a \d+$')
        b.wait_for(r'^VMCLOUD-REACH 10\.9\.0\.3:80 no$')
        self.assertNotIn('VMCLOUD-REACH 10.9.0.3:80 yes', b.output())
        a.wait_for(r'^VMCLOUD-STREAM-RECEIVED ')
        self.assertIn('VMCLOUD-STREAM-RECEIVED 1000 ok\n', a.output())
        b.wait_for(r'^VMCLOUD-STREAM-SENT 1000$')
        # the probes stop after reach_tries rounds: none come in the time of two more
        b.wait_for(r'(?s)(^VMCLOUD-REACH 10\.9\.0\.3:80 .*){5}')
        tick = int(re.findall(r'^VMCLOUD-TICK (\d+)$', b.output(), re.MULTILINE)[-1])
        b.wait_for(rf'^VMCLOUD-TICK {tick + 16}$')
        self.assertEqual(5, b.output().count('VMCLOUD-REACH 10.9.0.1:80 '))
        self.assertEqual(5, b.output().count('VMCLOUD-REACH 10.9.0.3:80 '))


class TestRealisticGuestNetwork(base.TestCase):

    def test_dhcp_and_http_without_markers_and_markers_by_default(self):
        # Two at once: with vmcloud.markers=0 the image knows nothing of vmcloud (DHCP,
        # HTTP, no VMCLOUD- line); without it, its marker unit prints them (benchmarks
        # boot it by its markers).
        disk = guest.realistic_disk()
        with open(os.path.join(guest.GUEST_DIR, 'realistic', 'cmdline')) as f:
            cmdline = f.read().strip()
        port, marked_port = free_port(), free_port()
        g = Guest(self, 'realistic-guest', slirp(port), '52:54:00:12:34:21',
                  cmdline + ' vmcloud.markers=0', guest.path('vmlinuz'),
                  guest.path('initrd.img'), disk, memory_mib=512)
        marked = Guest(self, 'realistic-marked', slirp(marked_port), '52:54:00:12:34:22',
                       cmdline, guest.path('vmlinuz'), guest.path('initrd.img'), disk,
                       memory_mib=512)
        # the hostfwd reaches 10.0.2.15: an answer means networkd took slirp's lease
        status, body = first_answer(port, REALISTIC_TIMEOUT)
        self.assertEqual((200, b'vmcloud realistic guest\n'), (status, body))
        self.assertIsNone(g.process.poll())
        self.assertEqual((200, b'vmcloud realistic guest\n'),
                         first_answer(marked_port, REALISTIC_TIMEOUT))
        marked.wait_for(r'^VMCLOUD-PHASE app-running\s*$', timeout=REALISTIC_TIMEOUT)
        self.assertNotIn('VMCLOUD-', g.output())
