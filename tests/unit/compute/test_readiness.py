"""Readiness checks on the fake driver, the network agent's probes stood in for: each kind
passes when its signal comes, and fails naming the instance, the check and the last error."""
from vmcloud import exception
from vmcloud.compute import readiness
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import fake
from vmcloud.network import fake as fake_agent
from tests import base
from tests.unit.dispatcher import helpers

# Far above what any check here needs: a check that never ends fails the test instead.
WAIT = 30
NETWORK, NAMESPACE, ADDRESS = 'net1', 'vmcloud-1000-test', '10.200.0.2'


class Probes:
    """Stands in for the network agent's probes: each probe answers the next of ``answers``
    (an exception is raised), the last one for good; every call is in ``calls``."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls: list[tuple] = []

    def _answer(self, *call):
        self.calls.append(call)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def tcp_connect(self, network_id, address, port, timeout):
        return self._answer('tcp', network_id, address, port, timeout)

    def http_get(self, network_id, address, port, path, timeout):
        return self._answer('http', network_id, address, port, path, timeout)


def refused(port: int = 80) -> exception.NetworkError:
    return exception.NetworkError(f'TCP connection to {ADDRESS}:{port} from namespace '
                                  f'{NAMESPACE}: connection refused')


class WaitReadyTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('health_interval', 0.01, 'network')
        self.driver = fake.FakeDriver(self.conf)
        self.driver.spawn(driver_base.InstanceSpec(name='vm1',
                                                   disk=helpers.write_image(self.tmp)))
        self.console = self.driver.instances['vm1'].console
        self.agent = Probes(None)

    def probes(self, *answers) -> Probes:
        self.agent = Probes(*answers)
        return self.agent

    def wait(self, health: dict, timeout: float = WAIT, on_network: bool = True) -> float:
        agent = self.agent if on_network else None
        return readiness.wait_ready(self.driver, agent, 'vm1', health, NETWORK, ADDRESS,
                                    timeout)

    def test_marker_is_the_boot_done_marker(self):
        self.assertGreaterEqual(self.wait({'kind': 'marker'}), 0)
        self.console.clear()
        error = self.assertRaises(exception.GuestTimeout, self.wait, {'kind': 'marker'},
                                  on_network=False)
        self.assertIn('instance vm1 did not pass its marker check', str(error))
        self.assertIn('boot-done', str(error))

    def test_console_waits_for_a_matching_line(self):
        self.console[:] = ['booting']
        console_log = self.driver.console_log
        reads = []

        def log(name):
            reads.append(name)
            if len(reads) == 3:
                self.console.append('app listening on :80')
            return console_log(name)
        self.driver.console_log = log
        self.wait({'kind': 'console', 'pattern': r'^app listening'}, on_network=False)
        self.assertEqual(3, len(reads))

    def test_console_timeout_names_the_check_and_what_the_console_says(self):
        self.console[:] = ['booting', 'still booting']
        error = self.assertRaises(exception.GuestTimeout, self.wait,
                                  {'kind': 'console', 'pattern': 'ready'}, 0.1)
        self.assertIn('instance vm1 did not pass its console:ready check within 0.1 s',
                      str(error))
        self.assertIn("last error: no console line matches 'ready'; it ends with: booting | "
                      'still booting', str(error))

    def test_console_needs_a_console(self):
        self.driver.capabilities = (type(self.driver).capabilities
                                    & ~driver_base.Capability.CONSOLE_LOG)
        self.assertRaises(exception.NotSupported, self.wait,
                          {'kind': 'console', 'pattern': 'ready'})

    def test_tcp_passes_once_a_connection_opens_from_the_namespace(self):
        self.conf.set_override('health_probe_timeout', 2.5, 'network')
        probes = self.probes(refused(), refused(), None)
        self.wait({'kind': 'tcp', 'port': 80})
        self.assertEqual(3, len(probes.calls))
        for kind, network_id, address, port, timeout in probes.calls:
            self.assertEqual(('tcp', NETWORK, ADDRESS, 80), (kind, network_id, address, port))
            self.assertLessEqual(timeout, 2.5)  # each probe bounded

    def test_tcp_timeout_names_instance_check_and_last_error(self):
        self.probes(refused())
        error = self.assertRaises(exception.GuestTimeout, self.wait,
                                  {'kind': 'tcp', 'port': 80}, 0.1)
        self.assertIn('instance vm1 did not pass its tcp:80 check within 0.1 s; last error: '
                      f'TCP connection to {ADDRESS}:80 from namespace {NAMESPACE}: connection '
                      'refused', str(error))

    def test_a_probe_never_runs_past_the_deadline(self):
        probes = self.probes(refused())
        self.assertRaises(exception.GuestTimeout, self.wait, {'kind': 'tcp', 'port': 80}, 0.2)
        self.assertTrue(all(call[-1] <= 0.2 for call in probes.calls), probes.calls)

    def test_http_passes_on_any_answer_below_500(self):
        probes = self.probes(refused(8080), (503, b'starting'), (404, b'no such page'))
        self.wait({'kind': 'http', 'port': 8080, 'path': '/health'})
        self.assertEqual([('http', NETWORK, ADDRESS, 8080, '/health')] * 3,
                         [call[:-1] for call in probes.calls])

    def test_http_timeout_names_the_last_status(self):
        self.probes((500, b'broken'))
        error = self.assertRaises(exception.GuestTimeout, self.wait,
                                  {'kind': 'http', 'port': 80}, 0.1)
        self.assertIn('instance vm1 did not pass its http:80/ check within 0.1 s; last error: '
                      f'http://{ADDRESS}:80/ answered 500', str(error))

    def test_a_guest_that_stops_fails_at_once(self):
        self.probes(refused())
        self.driver.stop('vm1')
        # WAIT s to go: the check ends because the guest stopped, not by its timeout.
        error = self.assertRaises(exception.GuestTimeout, self.wait,
                                  {'kind': 'tcp', 'port': 80}, WAIT)
        self.assertIn('instance vm1 stopped before it passed its tcp:80 check; last error: '
                      'TCP connection', str(error))
        self.console.clear()
        error = self.assertRaises(exception.GuestTimeout, self.wait,
                                  {'kind': 'console', 'pattern': 'x'}, WAIT)
        self.assertIn('stopped before it passed its console:x check', str(error))

    def test_tcp_and_http_need_a_network(self):
        probes = self.probes(None)
        for health in ({'kind': 'tcp', 'port': 80}, {'kind': 'http', 'port': 80}):
            error = self.assertRaises(exception.InvalidRequest, self.wait, health, on_network=False)
            self.assertIn('needs it on a network', str(error))
        self.assertEqual([], probes.calls)


class HealthSyntaxTest(base.TestCase):
    def test_each_kind_is_parsed(self):
        for text, health in (
                ('marker', {'kind': 'marker'}),
                ('tcp:22', {'kind': 'tcp', 'port': 22}),
                ('http:80', {'kind': 'http', 'port': 80, 'path': '/'}),
                ('http:8080/ready?x=1', {'kind': 'http', 'port': 8080, 'path': '/ready?x=1'}),
                ('console:^login: ', {'kind': 'console', 'pattern': '^login: '}),
                ('console:a:b', {'kind': 'console', 'pattern': 'a:b'})):
            self.assertEqual(health, readiness.parse(text), text)
            self.assertEqual(health, readiness.parse(readiness.describe(health)))

    def test_malformed_values_are_named_with_the_syntax(self):
        for text, problem in (('tcp', 'is not one of'), ('tcp:', "port '' is not a number"),
                              ('tcp:http', 'is not a number'), ('tcp:0', 'port 1-65535'),
                              ('tcp:70000', 'port 1-65535'), ('tcp:80/x', 'has no path'),
                              ('http:x/', 'is not a number'), ('console:', 'needs a pattern'),
                              ('console:(', 'is no regular expression'),
                              ('marker:x', 'is not one of'), ('ping:1', 'is not one of'),
                              ('', 'is not one of')):
            error = self.assertRaises(exception.InvalidRequest, readiness.parse, text)
            self.assertIn(f'health check {text!r}', str(error))
            self.assertIn(problem, str(error))
            self.assertIn(readiness.SYNTAX, str(error))

    def test_a_request_is_checked(self):
        self.assertEqual({'kind': 'marker'}, readiness.check(None))
        self.assertEqual({'kind': 'marker'}, readiness.check({}))
        self.assertEqual({'kind': 'tcp', 'port': 80, 'timeout': 5},
                         readiness.check({'kind': 'tcp', 'port': 80, 'timeout': 5}))
        for health, problem in (({'kind': 'tcp', 'port': '80'}, 'port 1-65535'),
                                ({'kind': 'tcp', 'port': True}, 'port 1-65535'),
                                ({'kind': 'tcp', 'port': 80, 'path': '/'}, 'has no path'),
                                ({'kind': 'marker', 'timeout': 0}, 'above 0'),
                                ({'kind': 'http', 'port': 80, 'path': 'x'}, 'start with /'),
                                ({'kind': 'nope'}, "kind 'nope'"), ('tcp:80', 'is a dict')):
            error = self.assertRaises(exception.InvalidRequest, readiness.check, health)
            self.assertIn(problem, str(error))


class WaitReadyOnFakeNetworkTest(base.TestCase):
    """The checks through the fake network agent, to a fake guest on its network."""

    def test_tcp_and_http_pass_once_the_guest_serves_and_fail_when_it_does_not(self):
        self.conf.set_override('health_interval', 0.01, 'network')
        driver = fake.FakeDriver(self.conf)
        agent = fake_agent.FakeNetworkAgent(self.conf, [driver])
        port = {'mac': '52:54:00:00:00:02', 'address': ADDRESS}
        bridge = agent.plug({'id': NETWORK, 'vni': 1000, 'cidr': '10.200.0.0/24'},
                            {'mac': '52:54:00:00:00:fe', 'address': '10.200.0.254'}, [],
                            'vm1', port)
        driver.spawn(driver_base.InstanceSpec(
            name='vm1', disk=helpers.write_image(self.tmp), cmdline='vmcloud.id=vm1',
            nics=(driver_base.Nic(mac=port['mac'], bridge=bridge),)))
        for health in ({'kind': 'tcp', 'port': 80}, {'kind': 'http', 'port': 80}):
            readiness.wait_ready(driver, agent, 'vm1', health, NETWORK, ADDRESS, WAIT)
        error = self.assertRaises(exception.GuestTimeout, readiness.wait_ready, driver,
                                  agent, 'vm1', {'kind': 'tcp', 'port': 8080}, NETWORK,
                                  ADDRESS, 0.1)
        self.assertIn(f'TCP connection to {ADDRESS}:8080 from namespace '
                      f'{agent.namespace(NETWORK)}: connection refused', str(error))
