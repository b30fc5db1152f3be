"""``vmcloud mirror-service``: the guests' disks outlive the process that asked for them.

The service runs as a real process; the "manager" that creates a mirror is another
process, killed with SIGKILL; qemu-io and nbdcopy play the guest.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap

from vmcloud import exception
from vmcloud.mirror import api
from vmcloud.storage import warehouse
from tests import base

CHUNK = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


class MirrorServiceTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.conf.set_override('host', 'node1')
        self.image = random.Random(5).randbytes(16 * CHUNK)
        path = os.path.join(self.tmp, 'base.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        self.warehouse = warehouse.Warehouse(self.conf)
        self.warehouse.import_image(path, 'base')
        self.log = os.path.join(self.tmp, 'service.log')
        self.config = self.write_config(DEFAULT={'host': 'node1', 'log_file': self.log},
                                        storage={'chunk_size': CHUNK})
        self.client = api.RemoteMirrors(self.conf, timeout=60)

    def service_command(self) -> list[str]:
        return [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.config,
                'mirror-service']

    def start_service(self) -> subprocess.Popen:
        service = subprocess.Popen(self.service_command(), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.addCleanup(service.stderr.close)
        self.addCleanup(service.stdout.close)
        self.addCleanup(base.stop_process, service)
        if service.stdout.readline().strip() != 'running':
            base.stop_process(service)
            with open(self.log) if os.path.exists(self.log) else open(os.devnull) as f:
                self.fail(f'the mirror service did not start: {service.stderr.read()}'
                          f'{f.read()}')
        return service

    def manager_creates(self, name: str) -> tuple[subprocess.Popen, str]:
        """A process that asks the service for a mirror, prints its URI and stays."""
        script = textwrap.dedent('''
            import sys
            import vmcloud.conf
            from vmcloud.mirror import api
            conf = vmcloud.conf.CONF
            conf(['--config-file', sys.argv[1]], project='vmcloud')
            print(api.RemoteMirrors(conf, timeout=60).create(sys.argv[2], 'base').uri,
                  flush=True)
            sys.stdin.read()
        ''')
        manager = subprocess.Popen([sys.executable, '-c', script, self.config, name],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   cwd=ROOT)
        self.addCleanup(lambda: manager.poll() is None and (manager.kill(), manager.wait()))
        self.addCleanup(manager.stdout.close)
        self.addCleanup(manager.stdin.close)
        uri = manager.stdout.readline().strip()
        self.assertTrue(uri.startswith('nbd+unix:///vm1?socket='), uri)
        return manager, uri

    def write(self, uri: str, pattern: int, offset: int, length: int) -> None:
        """A guest's write and flush."""
        result = subprocess.run(
            ['qemu-io', '-f', 'raw', '-c', f'write -P {pattern} {offset} {length}',
             '-c', 'flush', uri], capture_output=True, text=True, timeout=60)
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertNotIn('failed', result.stdout + result.stderr)

    def read_all(self, uri: str) -> bytes:
        out = os.path.join(self.tmp, 'readback.raw')
        subprocess.run(['nbdcopy', uri, out], check=True, timeout=60)
        with open(out, 'rb') as f:
            return f.read()

    def test_disks_outlive_the_manager_and_come_back_with_the_service(self):
        service = self.start_service()
        manager, uri = self.manager_creates('vm1')
        self.assertEqual(['mirror.node1.vm1'], self.warehouse.holders('base', 1))
        expected = bytearray(self.image)
        self.write(uri, 171, CHUNK + 512, 4096)
        expected[CHUNK + 512:CHUNK + 4608] = bytes([171]) * 4096

        manager.send_signal(signal.SIGKILL)  # the compute manager dies
        manager.wait()
        # The disk is still served, with what was written, and still takes writes.
        self.assertBytesEqual(bytes(expected), self.read_all(uri))
        self.write(uri, 172, 5 * CHUNK, 2 * CHUNK)
        expected[5 * CHUNK:7 * CHUNK] = bytes([172]) * 2 * CHUNK
        self.assertEqual(['vm1'], self.client.names())

        # A clean stop, then a start: the mirror is served again, writes and all.
        service.terminate()
        self.assertEqual(0, service.wait(60))
        self.assertFalse(os.path.exists(self.conf.mirror.control_socket))
        service = self.start_service()
        self.assertEqual(['vm1'], self.client.names())
        self.assertBytesEqual(bytes(expected), self.read_all(uri))

        # A crash: every flushed write survives it.
        self.write(uri, 173, 15 * CHUNK, 100)
        expected[15 * CHUNK:15 * CHUNK + 100] = bytes([173]) * 100
        service.send_signal(signal.SIGKILL)
        service.wait()
        self.assertRaises(exception.MirrorServiceUnavailable, self.client.names)
        self.start_service()
        self.assertEqual(['vm1'], self.client.names())
        self.assertBytesEqual(bytes(expected), self.read_all(uri))

        self.client.remove('vm1')
        self.assertEqual([], self.client.names())
        self.assertEqual([], self.warehouse.holders('base', 1))

    def test_a_second_service_is_refused_naming_the_first(self):
        first = self.start_service()
        second = subprocess.run(self.service_command(), capture_output=True, timeout=60,
                                cwd=ROOT)
        self.assert_one_line_error(second, b'mirror service control socket at ',
                                   f'in use by pid {first.pid} ('.encode(), b'mirror-service')
        self.assertEqual(b'', second.stdout)
        self.assertEqual(first.pid, self.client.wait(30)['pid'])

    def test_a_bad_request_is_an_error_and_the_service_stays_up(self):
        self.start_service()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(self.conf.mirror.control_socket)
            sock.sendall(b'{"method": "format_disk"}\n{"method": "names"}\n')
            sock.shutdown(socket.SHUT_WR)
            with sock.makefile('rb') as answers:
                unknown, names = (json.loads(line) for line in answers)
        self.assertEqual('MirrorRequestInvalid', unknown['error']['class'])
        self.assertIn("unknown method 'format_disk'", unknown['error']['message'])
        self.assertEqual({'result': []}, names)
        error = self.assertRaises(exception.ImageNotFound, self.client.create, 'vm1', 'nosuch')
        self.assertEqual('nosuch', error.image)
        self.assertEqual([], self.client.names())
