"""Reaching the message bus: passwords masked, failures classified, retries bounded."""
import logging
import socket
import ssl
from unittest import mock

import fixtures
from amqp import exceptions as amqp_exceptions
from kombu import exceptions as kombu_exceptions

from vmcloud import exception
from vmcloud import rpc
from tests import base

SHOWN = 'rabbit://guest:***@127.0.0.1:5672/'


class MaskedUrlTest(base.TestCase):
    def test_every_password_is_masked(self):
        for url, masked in (
                ('rabbit://guest:guest@127.0.0.1:5672/', SHOWN),
                ('rabbit://u1:p1@h1:5672,u2:p2@h2:5673/vh?ssl=1',
                 'rabbit://u1:***@h1:5672,u2:***@h2:5673/vh?ssl=1'),
                # TransportURL.parse: the user ends at the first ':', the host starts
                # after the last '@'.
                ('rabbit://u:pa:ss@h/', 'rabbit://u:***@h/'),
                ('rabbit://u:p@ss@h/', 'rabbit://u:***@h/'),
                ('rabbit://u:p%2Fq@h/', 'rabbit://u:***@h/'),
                # Too malformed to parse: still masked, to name it in the error.
                ('rabbit//guest:s3cret@127.0.0.1:5672/', 'rabbit//guest:***@127.0.0.1:5672/'),
                ('rabbit://guest:s3cret@[::1:5672/', 'rabbit://guest:***@[::1:5672/')):
            self.assertEqual(masked, rpc.masked_url(url), url)

    def test_what_holds_no_password_is_kept(self):
        for url in ('rabbit://', 'rabbit://h1:5672,h2:5672/', 'rabbit://guest@h:5672/vh',
                    'fake://'):
            self.assertEqual(url, rpc.masked_url(url))


def operational(cause: BaseException) -> kombu_exceptions.OperationalError:
    """What kombu raises for a socket's failure: the OSError as its cause."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise kombu_exceptions.OperationalError(str(exc)) from exc
    except kombu_exceptions.OperationalError as wrapped:
        return wrapped


class ClassifyTest(base.TestCase):
    def classify(self, exc):
        return rpc.classify_connect_error(exc, SHOWN)

    def test_a_refused_login(self):
        error = self.classify(amqp_exceptions.AccessRefused(
            'ACCESS_REFUSED - Login was refused using authentication mechanism AMQPLAIN.'))
        self.assertIs(exception.MessageBusRefused, type(error))
        self.assertEqual(f'RabbitMQ at {SHOWN} refused the login (ACCESS_REFUSED - Login was '
                         'refused using authentication mechanism AMQPLAIN.)', str(error))

    def test_a_refused_virtual_host(self):
        error = self.classify(amqp_exceptions.NotAllowed('NOT_ALLOWED - vhost nope not found'))
        self.assertIs(exception.MessageBusRefused, type(error))
        self.assertIn('refused the connection (NOT_ALLOWED - vhost nope not found)', str(error))

    def test_a_failed_tls_handshake_is_refused(self):
        error = self.classify(operational(ssl.SSLError(1, 'WRONG_VERSION_NUMBER')))
        self.assertIs(exception.MessageBusRefused, type(error))
        self.assertIn(f'the TLS handshake with RabbitMQ at {SHOWN} failed', str(error))

    def test_a_socket_failure_is_unreachable(self):
        for cause, reason in ((ConnectionRefusedError(111, 'Connection refused'),
                               'Connection refused'),
                              (socket.gaierror(-2, 'Name or service not known'),
                               'Name or service not known'),
                              (TimeoutError('timed out'), 'timed out')):
            error = self.classify(operational(cause))
            self.assertIs(exception.MessageBusUnreachable, type(error))
            self.assertEqual(reason, str(error))

    def test_a_broker_closing_is_unreachable(self):
        # RabbitMQ starting or stopping: worth another try.
        error = self.classify(amqp_exceptions.ConnectionForced('shutdown'))
        self.assertIs(exception.MessageBusUnreachable, type(error))


class MalformedUrlTest(base.TestCase):
    def setUp(self):
        super().setUp()
        rpc.register_opts(self.conf)
        self.addCleanup(rpc.cleanup)

    def assert_bad(self, url: str, *fragments: str) -> None:
        self.conf.set_override('transport_url', url)
        error = self.assertRaises(exception.ConfigError, rpc.transport, self.conf)
        self.assertTrue(str(error).startswith(f'bad transport_url {rpc.masked_url(url)}: '),
                        error)
        self.assertNotIn('s3cret', str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        self.assertEqual({}, rpc._transports)

    def test_no_scheme(self):
        self.assert_bad('rabbit//guest:s3cret@127.0.0.1:5672/', 'No scheme specified')

    def test_a_port_that_is_no_number(self):
        self.assert_bad('rabbit://guest:s3cret@127.0.0.1:amqp/', "'amqp'")

    def test_a_port_out_of_range(self):
        self.assert_bad('rabbit://guest:s3cret@127.0.0.1:99999/', 'port 99999')

    def test_an_unknown_driver(self):
        self.assert_bad('rabbitmq://guest:s3cret@127.0.0.1/', "no messaging driver 'rabbitmq'")


class FakeClock(fixtures.Fixture):
    """rpc's time: sleeping advances it, nothing waits."""

    def _setUp(self):
        self.now = 1000.0
        self.slept: list[float] = []
        self.useFixture(fixtures.MockPatch('vmcloud.rpc.time.monotonic', lambda: self.now))
        self.useFixture(fixtures.MockPatch('vmcloud.rpc.time.sleep', self.sleep))

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class RetryTest(base.TestCase):
    """How often the bus is tried: the driver's connection stands replaced by a script."""

    def setUp(self):
        super().setUp()
        rpc.register_opts(self.conf)
        self.addCleanup(rpc.cleanup)
        self.conf.set_override('transport_url', 'rabbit://guest:s3cret@127.0.0.1:5672/')
        self.clock = self.useFixture(FakeClock())
        self.logged = self.useFixture(fixtures.FakeLogger(
            'vmcloud.rpc', level=logging.DEBUG, format='%(levelname)s %(message)s'))
        self.outcomes: list[Exception | None] = []
        self.connect = self.useFixture(fixtures.MockPatch(
            'vmcloud.rpc._connect_once', side_effect=self.next_outcome)).mock

    def next_outcome(self, conf, parsed, shown):
        outcome = self.outcomes.pop(0) if self.outcomes else exception.MessageBusUnreachable(
            f'cannot reach the message bus at {shown}: Connection refused')
        if outcome is not None:
            raise outcome

    def warnings(self) -> list[str]:
        return [line for line in self.logged.output.splitlines()
                if line.startswith('WARNING ') and 'trying again' in line]

    def test_a_client_tries_rpc_connect_retries_more_times_then_fails(self):
        self.conf.set_override('rpc_connect_retries', 2)
        error = self.assertRaises(exception.MessageBusUnreachable, rpc.transport, self.conf)
        self.assertEqual(3, self.connect.call_count)
        self.assertEqual(f'cannot reach the message bus at {SHOWN}: Connection refused',
                         str(error))
        self.assertEqual(2, len(self.clock.slept))
        self.assertEqual([], self.warnings())  # the CLI's one line says it all
        self.assertEqual({}, rpc._transports)

    def test_a_service_warns_before_each_pause_until_its_timeout(self):
        self.conf.set_override('rpc_startup_timeout', 60)
        self.assertRaises(exception.MessageBusUnreachable, rpc.wait_for_bus, self.conf)
        self.assertEqual(60, sum(self.clock.slept))
        self.assertEqual(self.connect.call_count - 1, len(self.clock.slept))
        self.assertLessEqual(max(self.clock.slept), rpc._LONGEST_PAUSE)
        warnings = self.warnings()
        self.assertEqual(len(self.clock.slept), len(warnings))
        for line in warnings:
            self.assertIn(f'cannot reach the message bus at {SHOWN}', line)
            self.assertNotIn('s3cret', line)

    def test_a_service_goes_on_once_the_bus_answers(self):
        self.conf.set_override('rpc_startup_timeout', 60)
        self.outcomes = [exception.MessageBusUnreachable('down'), None]
        opened = rpc.wait_for_bus(self.conf)
        self.assertEqual(2, self.connect.call_count)
        self.assertEqual(1, len(self.warnings()))
        # The RPC servers and clients the service makes next use it: no second check.
        self.assertIs(opened, rpc.transport(self.conf))
        self.assertEqual(2, self.connect.call_count)

    def test_a_refused_login_is_never_retried(self):
        self.conf.set_override('rpc_startup_timeout', 60)
        self.outcomes = [exception.MessageBusRefused('refused')]
        self.assertRaises(exception.MessageBusRefused, rpc.wait_for_bus, self.conf)
        self.assertEqual(1, self.connect.call_count)
        self.assertEqual([], self.clock.slept)

    def test_fake_needs_no_bus(self):
        self.conf.set_override('transport_url', 'fake://')
        rpc.wait_for_bus(self.conf)
        self.assertEqual(0, self.connect.call_count)


class ConnectOnceTest(base.TestCase):
    """The driver's own connection, on loopback."""

    def test_a_port_nothing_listens_on(self):
        rpc.register_opts(self.conf)
        self.addCleanup(rpc.cleanup)
        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            port = probe.getsockname()[1]
        url = f'rabbit://guest:s3cret@127.0.0.1:{port}/'
        self.conf.set_override('transport_url', url)
        self.conf.set_override('rpc_connect_retries', 0)
        error = self.assertRaises(exception.MessageBusUnreachable, rpc.transport, self.conf)
        self.assertEqual(f'cannot reach the message bus at {rpc.masked_url(url)}: '
                         'Connection refused', str(error))

    def test_a_url_without_a_host_names_the_default(self):
        rpc.register_opts(self.conf)
        refused = mock.Mock(side_effect=operational(ConnectionRefusedError(111, 'refused')))
        self.useFixture(fixtures.MockPatch('vmcloud.rpc.impl_rabbit.Connection', refused))
        parsed = rpc.messaging.TransportURL.parse(self.conf, 'rabbit://')
        error = self.assertRaises(exception.MessageBusUnreachable, rpc._connect_once,
                                  self.conf, parsed, 'rabbit://')
        self.assertEqual('cannot reach the message bus at rabbit:// (guest@localhost:5672): '
                         'refused', str(error))
