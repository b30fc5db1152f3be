"""A message bus that refuses us or cannot be reached, against the real RabbitMQ.

Each case runs the real ``vmcloud`` command: it must fail with one line on stderr
naming the URL, its password masked, and exit 1 -- the CLI within its retries, a
service at once for what no retry can fix, and after ``rpc_startup_timeout`` with
a warning per attempt for a bus nobody answers on.
"""
import os
import selectors
import socket
import subprocess
import sys
import threading
import uuid

import fixtures

from vmcloud import polling
from vmcloud import rpc
from tests import base

RABBIT = '127.0.0.1:5672'
# Far longer than any case takes: a command that retried what it should not
# would hit this instead of exiting by itself.
COMMAND_TIMEOUT = 120

CLI_COMMANDS = (('list',), ('deploy', 'guest', '-n', '1'))
SERVICE_COMMANDS = (('dispatcher',), ('compute', '--host', 'node1'))


def admin(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def free_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


class LateBus(fixtures.Fixture):
    """A loopback port that forwards to RabbitMQ once ``open()`` is called: a bus that
    comes up after the service. Until then nothing listens on it."""

    def __init__(self):
        super().__init__()
        self.port = free_port()

    def _setUp(self):
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.addCleanup(self._close)

    def open(self) -> None:
        self._listener = socket.create_server(('127.0.0.1', self.port))
        self._listener.settimeout(0.2)
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(RABBIT.split(':'), timeout=10)
            self._spawn(self._pump, client, upstream)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        with client, upstream, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            while not self._stop.is_set():
                for key, _ in selector.select(0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)

    def _close(self) -> None:
        self._stop.set()
        if hasattr(self, '_listener'):
            self._listener.close()
        for thread in self._threads:
            thread.join(5)


class MessagingErrorsTest(base.TestCase):
    def setUp(self):
        super().setUp()
        tag = uuid.uuid4().hex[:10]
        # A user of its own, so that its password appears nowhere else in the output
        # (guest's password is also its name).
        self.user, self.password = f'vmcloud-test-{tag}', f'pw-{uuid.uuid4().hex}'
        self.vhost = f'vmcloud-test-{tag}'
        admin('rabbitmqctl', '-q', 'add_user', self.user, self.password)
        self.addCleanup(admin, 'rabbitmqctl', '-q', 'delete_user', self.user)
        admin('rabbitmqctl', '-q', 'add_vhost', self.vhost)
        self.addCleanup(admin, 'rabbitmqctl', '-q', 'delete_vhost', self.vhost)
        admin('rabbitmqctl', '-q', 'set_permissions', '-p', self.vhost, self.user,
              '.*', '.*', '.*')

    def url(self, password: str | None = None, host: str = RABBIT, vhost: str | None = None):
        return (f'rabbit://{self.user}:{password or self.password}@{host}/'
                f'{self.vhost if vhost is None else vhost}')

    def run_vmcloud(self, url: str, *args: str, prefix: tuple[str, ...] = (),
                    **options) -> subprocess.CompletedProcess:
        defaults = {'transport_url': url, 'rpc_connect_retries': 1,
                    'rpc_startup_timeout': 600, 'rpc_call_timeout': 30}
        sections = {'DEFAULT': {**defaults, **options.pop('DEFAULT', {})}, **options}
        config = self.write_config(**sections)
        return subprocess.run([*prefix, sys.executable, '-m', 'vmcloud.cmd.cli',
                               '--config-file', config, *args],
                              capture_output=True, timeout=COMMAND_TIMEOUT)

    def assert_names_the_bus(self, result, url: str, *fragments: bytes) -> None:
        self.assert_one_line_error(result, rpc.masked_url(url).encode(), *fragments)
        for output in (result.stdout, result.stderr):
            self.assertNotIn(b'Traceback', output)
            self.assertNotIn(self.password.encode(), output)

    def assert_every_command_fails(self, url: str, *fragments: bytes, prefix=(),
                                   commands=CLI_COMMANDS + SERVICE_COMMANDS, **options):
        for command in commands:
            result = self.run_vmcloud(url, *command, prefix=prefix, **options)
            self.assert_names_the_bus(result, url, *fragments)

    def test_a_wrong_password(self):
        url = self.url(password='not-the-password')
        self.assert_every_command_fails(url, b'refused the login (ACCESS_REFUSED')
        self.assertIn(b'***', rpc.masked_url(url).encode())

    def test_an_unknown_virtual_host(self):
        self.assert_every_command_fails(self.url(vhost='no-such-vhost'),
                                        b'refused the connection (NOT_ALLOWED',
                                        b'no-such-vhost')

    def test_a_virtual_host_the_user_may_not_use(self):
        self.assert_every_command_fails(self.url(vhost='/'), b'refused the connection',
                                        commands=CLI_COMMANDS[:1])

    def test_a_malformed_url(self):
        for url, reason in ((self.url().replace('://', '//'), b'No scheme specified'),
                            (self.url(host='127.0.0.1:amqp'), b'bad transport_url'),
                            (self.url(host='127.0.0.1:99999'), b'port 99999')):
            self.assert_every_command_fails(url, b'bad transport_url', reason)

    def test_tls_against_a_plain_port(self):
        self.assert_every_command_fails(self.url(), b'the TLS handshake with RabbitMQ at',
                                        oslo_messaging_rabbit={'ssl': 'true'})

    def test_a_port_nothing_listens_on(self):
        url = self.url(host=f'127.0.0.1:{free_port()}')
        self.assert_every_command_fails(url, b'cannot reach the message bus at',
                                        b'Connection refused', commands=CLI_COMMANDS)
        self.assert_a_service_retries_then_fails(url, b'Connection refused')

    def test_an_unresolvable_host(self):
        # In a network namespace of its own (unshare -n: only a loopback, down), so the
        # lookup fails here instead of asking this machine's DNS server.
        url = self.url(host='rabbit.vmcloud.invalid:5672')
        isolated = ('unshare', '--net')
        self.assert_every_command_fails(url, b'cannot reach the message bus at',
                                        b'name resolution', prefix=isolated,
                                        commands=CLI_COMMANDS)
        self.assert_a_service_retries_then_fails(url, b'name resolution', prefix=isolated)

    def test_a_service_started_before_the_bus_goes_on_when_it_answers(self):
        bus = self.useFixture(LateBus())
        url = self.url(host=f'127.0.0.1:{bus.port}')
        config = self.write_config(DEFAULT={'transport_url': url, 'rpc_startup_timeout': 300,
                                            'rpc_call_timeout': 30})
        path = os.path.join(self.tmp, 'dispatcher.log')
        with open(path, 'wb') as log:
            dispatcher = subprocess.Popen(
                [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config,
                 'dispatcher'], stdout=log, stderr=subprocess.STDOUT)
        self.addCleanup(base.stop_process, dispatcher)

        def logged() -> str:
            with open(path, 'rb') as f:
                return f.read().decode()

        def retrying(text: str) -> bool:
            self.assertIsNone(dispatcher.poll(), text)
            return text.count('trying again') >= 2
        polling.wait(logged, retrying, COMMAND_TIMEOUT, 'the dispatcher to retry')
        bus.open()

        def started(text: str) -> bool:
            self.assertIsNone(dispatcher.poll(), text)
            return 'running\n' in text
        polling.wait(logged, started, COMMAND_TIMEOUT, 'the dispatcher to start')
        # It serves over the bus it waited for.
        result = self.run_vmcloud(url, 'list', '-f', 'json')
        self.assertEqual((0, b'[]'), (result.returncode, result.stdout.strip()), result.stderr)

    def assert_a_service_retries_then_fails(self, url: str, reason: bytes, prefix=()):
        shown = rpc.masked_url(url).encode()
        for command in SERVICE_COMMANDS:
            result = self.run_vmcloud(url, *command, prefix=prefix,
                                      DEFAULT={'rpc_startup_timeout': 4})
            self.assert_names_the_bus(result, url, reason)
            # Never silent: the service's log (stdout) warns before every pause.
            warnings = [line for line in result.stdout.splitlines()
                        if b'WARNING' in line and b'trying again' in line]
            self.assertGreaterEqual(len(warnings), 2, result.stdout)
            for line in warnings:
                self.assertIn(b'cannot reach the message bus at ' + shown, line)
                self.assertIn(reason, line)
            self.assertNotIn(b'running', result.stdout)
