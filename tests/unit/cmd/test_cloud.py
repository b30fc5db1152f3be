"""The cloud commands reach the dispatcher first, within [DEFAULT] cli_timeout, or fail
naming what did not answer: a dispatcher that is down, a bus that never answers."""
import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
import uuid

from tests import base
from vmcloud import rpc
from vmcloud.cmd import cli
from vmcloud.dispatcher import rpcapi

# Far below rpc_call_timeout (120 s): a command that waited out a call would hit this
# instead of exiting by itself.
COMMAND_TIMEOUT = 60


def admin(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


class NoPing:
    """A server on the dispatcher's topic that offers no ping."""

    @rpc.expose
    def list_deployments(self, ctxt: dict) -> list[dict]:
        return []


class SlowDispatcher:
    """Answers ping at once and list_deployments after ``delay`` seconds."""

    def __init__(self, delay: float):
        self.delay = delay

    @rpc.expose
    def ping(self, ctxt: dict) -> dict:
        return {'host': 'here'}

    @rpc.expose
    def list_deployments(self, ctxt: dict) -> list[dict]:
        time.sleep(self.delay)
        return [{'id': 'd1', 'state': 'active'}]


class InProcessTest(base.TestCase):
    """On fake://, where nothing but this process can answer."""

    def setUp(self):
        super().setUp()
        self.addCleanup(rpc.cleanup)
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('cli_timeout', 1)

    def test_no_dispatcher_is_one_line_naming_it(self):
        # Only the ping's timeout ends this, well before the call's.
        self.conf.set_override('rpc_call_timeout', 20)
        rc, out, err = run_cli('list')
        self.assertEqual(1, rc)
        self.assertEqual('', out)
        self.assertEqual('vmcloud: error: the dispatcher did not answer within 1 s on fake:// '
                         '(topic vmcloud-dispatcher): is `vmcloud dispatcher` running?\n', err)

    def test_the_request_itself_keeps_the_call_timeout(self):
        # Answered after cli_timeout: the ping's timeout is not the request's.
        server = rpc.server(self.conf, rpcapi.TOPIC, 'dispatcher', [SlowDispatcher(1.5)])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        rc, out, err = run_cli('list', '-f', 'json')
        self.assertEqual((0, ''), (rc, err))
        self.assertIn('"d1"', out)

    def test_an_answer_other_than_silence_is_said_as_it_is(self):
        # Only no answer at all is "did not answer": anything else names itself.
        server = rpc.server(self.conf, rpcapi.TOPIC, 'dispatcher', [NoPing()])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        rc, out, err = run_cli('list')
        # (the server, in this process, logs what it was asked on stderr too)
        self.assertEqual((1, 'vmcloud: error: the dispatcher does not offer ping'),
                         (rc, err.splitlines()[-1]))


class DeployingDispatcher:
    """Answers ping, and deploy with an active deployment; ``deployed``: each deploy's
    arguments."""

    def __init__(self):
        self.deployed: list[dict] = []

    @rpc.expose
    def ping(self, ctxt: dict) -> dict:
        return {'host': 'here'}

    @rpc.expose
    def deploy(self, ctxt: dict, **kwargs) -> dict:
        self.deployed.append(kwargs)
        return {'id': 'd1', 'state': 'active', 'instances': []}


class DeployHealthTest(base.TestCase):
    """``deploy --health`` reaches the dispatcher as readiness takes it, or is refused."""

    def setUp(self):
        super().setUp()
        self.addCleanup(rpc.cleanup)
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('cli_timeout', 5)
        self.dispatcher = DeployingDispatcher()
        server = rpc.server(self.conf, rpcapi.TOPIC, 'dispatcher', [self.dispatcher])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)

    def deployed_health(self, *argv: str) -> dict:
        rc, out, err = run_cli('deploy', 'guest', '-f', 'json', *argv)
        self.assertEqual(0, rc, err)
        return self.dispatcher.deployed[-1]['health']

    def test_each_kind_reaches_the_dispatcher(self):
        self.assertEqual({'kind': 'marker'}, self.deployed_health())
        self.assertEqual({'kind': 'marker'}, self.deployed_health('--health', 'marker'))
        self.assertEqual({'kind': 'tcp', 'port': 22}, self.deployed_health('--health', 'tcp:22'))
        self.assertEqual({'kind': 'http', 'port': 80, 'path': '/'},
                         self.deployed_health('--health', 'http:80'))
        self.assertEqual({'kind': 'http', 'port': 8080, 'path': '/ready', 'timeout': 20.0},
                         self.deployed_health('--health', 'http:8080/ready',
                                              '--health-timeout', '20'))
        self.assertEqual({'kind': 'console', 'pattern': '^login: '},
                         self.deployed_health('--health=console:^login: '))

    def refused(self, *argv: str) -> str:
        """:returns: what the command said as it exited non-zero, having asked nothing."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exited:
            cli.main(['deploy', *argv])
        self.assertNotEqual(0, exited.exception.code)
        self.assertEqual([], self.dispatcher.deployed)
        return err.getvalue()

    def test_a_malformed_value_is_refused_naming_it_and_the_syntax(self):
        for value, problem in (('tcp:x', "the port 'x' is not a number"),
                               ('http:99999', 'port 1-65535'), ('ping', 'is not one of'),
                               ('console:(', 'no regular expression')):
            err = self.refused('guest', '--health', value)
            self.assertIn(f"argument --health: health check '{value}'", err)
            self.assertIn(problem, err)
            self.assertIn('tcp:PORT | http:PORT[/PATH] | console:REGEX | marker', err)

    def test_a_health_check_goes_with_an_image(self):
        self.assertIn('--health and --health-timeout go with IMAGE, not --from-snapshot',
                      self.refused('--from-snapshot', 's1', '--health', 'tcp:80'))
        self.assertIn('--health-timeout must be above 0',
                      self.refused('guest', '--health-timeout', '0'))


class BusThatNeverAnswers:
    """A loopback port that takes TCP connections and never says a word: a broker that
    hangs, or a host that drops packets, as the client sees them."""

    def __init__(self):
        self._listener = socket.create_server(('127.0.0.1', 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self._accepted.append(self._listener.accept()[0])
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for each in self._accepted + [self._listener]:
            each.close()


class SubprocessTest(base.TestCase):
    """The real command in a process of its own."""

    def vmcloud(self, url: str, *argv: str, **options) -> subprocess.CompletedProcess:
        config = self.write_config(DEFAULT={'transport_url': url, 'cli_timeout': 2, **options})
        return subprocess.run([sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config,
                               *argv], capture_output=True, timeout=COMMAND_TIMEOUT)

    def test_rabbitmq_without_a_dispatcher(self):
        # A virtual host of its own: no dispatcher another test runs can answer there.
        vhost = f'vmcloud-test-{uuid.uuid4().hex[:10]}'
        admin('rabbitmqctl', '-q', 'add_vhost', vhost)
        self.addCleanup(admin, 'rabbitmqctl', '-q', 'delete_vhost', vhost)
        admin('rabbitmqctl', '-q', 'set_permissions', '-p', vhost, 'guest', '.*', '.*', '.*')
        url = f'rabbit://guest:guest@127.0.0.1:5672/{vhost}'
        for argv in (('list',), ('deploy', 'guest', '-n', '2', '--wait')):
            result = self.vmcloud(url, *argv)
            self.assert_one_line_error(
                result, b'the dispatcher did not answer within 2 s on ',
                f'rabbit://guest:***@127.0.0.1:5672/{vhost} (topic vmcloud-dispatcher): '
                'is `vmcloud dispatcher` running?'.encode())
            self.assertNotIn(b'guest:guest', result.stderr)

    def test_a_bus_that_never_answers(self):
        bus = BusThatNeverAnswers()
        self.addCleanup(bus.close)
        url = f'rabbit://guest:guest@127.0.0.1:{bus.port}/'
        # Four attempts of kombu's 5 s connect timeout each, if nothing bounded them.
        result = self.vmcloud(url, 'host', 'list', rpc_connect_retries=3)
        self.assert_one_line_error(
            result, f'cannot reach the message bus at rabbit://guest:***@127.0.0.1:{bus.port}/ '
                    'within 2 s ([DEFAULT] cli_timeout)'.encode())
