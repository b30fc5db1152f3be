"""The Monitor (live figures from the dispatcher's counts and the gateway's connections,
coalesced; the sampler and its history; the events) over a stub dispatcher and clocks of
the test's, and the /v1/monitoring routes over it."""
import copy
import datetime
import logging
import threading

import fixtures

from tests import base
from tests.unit.api import test_resources
from vmcloud import exception
from vmcloud.api import monitor as monitor_mod

EPOCH = 1_700_000_000.0
# Long enough never to be waited out: a test that waits that long has failed.
SAFETY_TIMEOUT = 60
# What "stop is prompt" allows: generous beside stop's brief join, well below the RPC
# timeout (30 s by default) a dispatcher that does not answer would make it wait.
PROMPT = 10


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


class Clock:
    """Both of the Monitor's clocks, moved by the test alone."""

    def __init__(self):
        self.elapsed = 0.0

    def monotonic(self) -> float:
        return self.elapsed

    def wall(self) -> float:
        return EPOCH + self.elapsed

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds


def figures() -> dict:
    """A DispatcherAPI.monitoring answer: two clouds."""
    return {
        'clouds': {
            'default': {'connection_limit': 100, 'hosts': [], 'hosts_up': 2, 'hosts_total': 3,
                        'deployments': {'active': 2, 'error': 1},
                        'instances': {'active': 3, 'building': 1},
                        'applications_deployed': ['web', 'db'],
                        'applications_running': ['web']},
            'edge': {'connection_limit': 2, 'hosts': ['h1'], 'hosts_up': 1, 'hosts_total': 1,
                     'deployments': {}, 'instances': {},
                     'applications_deployed': [], 'applications_running': []}},
        'deployments': {'active': 2, 'error': 1, 'deleted': 4},
        'instances': {'active': 3, 'building': 1, 'deleted': 8},
        'hosts': {'h1': {'state': 'up', 'up': True, 'cpus': 4, 'cpu_busy': 0.5,
                         'cache_bytes': 1000, 'fetched_bytes': 5000, 'peer_bytes': 0,
                         'instances': 2}}}


def connection(client: str, cloud: str, port: int = 40000, started: float = EPOCH - 30,
               application: str | None = 'web') -> dict:
    """A gateway's connection record (started_at in epoch seconds)."""
    return {'client': client, 'client_port': port, 'cloud': cloud,
            'application': application, 'deployment': 'd1', 'instance': 'i1',
            'instance_name': 'web-1', 'listener_port': 21000, 'started_at': started}


class StubDispatcher:
    """monitoring, gateway_connections, gateway_stats and recent_events of a
    DispatcherAPI; ``calls`` counts them; an ``*_error`` set is raised instead."""

    def __init__(self):
        self.figures = figures()
        self.connections = [connection('10.0.0.1', 'default', 40000),
                            connection('10.0.0.1', 'default', 40001),
                            connection('10.0.0.2', 'default', 40002, started=0,
                                       application=None),
                            connection('10.0.0.3', 'edge', 40003),
                            connection('10.0.0.4', 'edge', 40004),
                            connection('10.0.0.5', 'edge', 40005)]
        self.stats = {'default': {'users_connected': 2, 'total_connections': 120,
                                  'rejected_connections': 3, 'bytes_in': 1000,
                                  'bytes_out': 9000},
                      'edge': {'users_connected': 3, 'total_connections': 7,
                               'rejected_connections': 0, 'bytes_in': 10, 'bytes_out': 90}}
        self.events = [{'at': iso(EPOCH - i), 'event': f'e{i}', 'payload': {'i': i}}
                       for i in range(10)]
        self.monitoring_error: Exception | None = None
        self.gateway_error: Exception | None = None
        self.calls: dict[str, int] = {}
        self.answered = threading.Event()  # set at each monitoring answer
        self.blocked: threading.Event | None = None  # monitoring waits for it if set
        self.entered = threading.Event()

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    def monitoring(self) -> dict:
        self._count('monitoring')
        self.entered.set()
        if self.blocked is not None:
            self.blocked.wait(SAFETY_TIMEOUT)
        if self.monitoring_error is not None:
            raise self.monitoring_error
        self.answered.set()
        return copy.deepcopy(self.figures)

    def gateway_connections(self, cloud=None) -> list[dict]:
        self._count('gateway_connections')
        if self.gateway_error is not None:
            raise self.gateway_error
        return copy.deepcopy([c for c in self.connections if cloud in (None, c['cloud'])])

    def gateway_stats(self, cloud=None) -> dict:
        self._count('gateway_stats')
        if self.gateway_error is not None:
            raise self.gateway_error
        return copy.deepcopy(self.stats)

    def recent_events(self, limit=50) -> list[dict]:
        self._count('recent_events')
        if self.monitoring_error is not None:
            raise self.monitoring_error
        return self.events[:limit]


def gateway_down() -> exception.GatewayUnavailable:
    return exception.GatewayUnavailable(['gw1'], 5.0)


class MonitorTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.conf.set_override('live_max_age', 0.2, 'api')
        self.log = self.useFixture(fixtures.FakeLogger(level=logging.INFO))
        self.dispatcher = StubDispatcher()
        self.clock = Clock()
        self.monitor = self.make_monitor()

    def make_monitor(self) -> monitor_mod.Monitor:
        monitor = monitor_mod.Monitor(self.conf, self.dispatcher, clock=self.clock.monotonic,
                                      wall_clock=self.clock.wall)
        self.addCleanup(monitor.stop)
        return monitor

    def test_each_clouds_figures_with_the_gateways_connections(self):
        live = self.monitor.live()
        self.assertEqual({'sampled_at': iso(EPOCH), 'gateway': 'ok',
                          'deployments': {'active': 2, 'error': 1, 'deleted': 4},
                          'instances': {'active': 3, 'building': 1, 'deleted': 8}},
                         {k: v for k, v in live.items() if k != 'clouds'})
        self.assertEqual([
            {'name': 'default', 'connection_limit': 100, 'deployments': 3,
             'applications_deployed': 2, 'applications_running': 1, 'instances_running': 3,
             'instances': {'active': 3, 'building': 1},
             'users': 2, 'connections': 3, 'available': 97, 'hosts_up': 2, 'hosts_total': 3},
            # More connections than its limit (one lowered since): none available, not -1.
            {'name': 'edge', 'connection_limit': 2, 'deployments': 0,
             'applications_deployed': 0, 'applications_running': 0, 'instances_running': 0,
             'instances': {}, 'users': 3, 'connections': 3, 'available': 0, 'hosts_up': 1,
             'hosts_total': 1}], live['clouds'])

    def test_without_the_gateway_the_connections_are_unknown_and_the_rest_answers(self):
        self.dispatcher.gateway_error = gateway_down()
        live = self.monitor.live()
        self.assertEqual(f'unavailable: {gateway_down()}', live['gateway'])
        for cloud in live['clouds']:
            self.assertEqual((None, None, None),
                             (cloud['users'], cloud['connections'], cloud['available']))
        self.assertEqual([3, 0], [c['instances_running'] for c in live['clouds']])
        self.assertRaises(exception.GatewayUnavailable, self.monitor.connections)

    def test_a_gateway_question_that_times_out_is_the_gateways_alone(self):
        self.dispatcher.gateway_error = exception.MessagingError('no answer to '
                                                                 'gateway_connections')
        live = self.monitor.live()
        self.assertEqual('unavailable: no answer to gateway_connections', live['gateway'])
        self.assertEqual(2, len(live['clouds']))
        self.assertRaises(exception.MessagingError, self.monitor.connections)

    def test_a_gateway_that_failed_is_asked_again_only_after_a_while(self):
        self.dispatcher.gateway_error = gateway_down()
        self.monitor.live()
        self.dispatcher.gateway_error = None
        self.clock.advance(1)  # past live_max_age: the dispatcher is asked, not the gateway
        self.assertTrue(self.monitor.live()['gateway'].startswith('unavailable: '))
        self.assertEqual((2, 1), (self.dispatcher.calls['monitoring'],
                                  self.dispatcher.calls['gateway_connections']))
        self.clock.advance(monitor_mod.GATEWAY_RETRY)
        self.assertEqual('ok', self.monitor.live()['gateway'])
        self.assertEqual(2, self.dispatcher.calls['gateway_connections'])
        # Once when it went, once when it came back: not at every question.
        self.assertEqual(1, self.log.output.count('the gateway does not answer'))
        self.assertEqual(1, self.log.output.count('the gateway answers again'))

    def test_no_gateway_registered_is_no_warning_but_a_silent_one_is(self):
        log = self.useFixture(fixtures.FakeLogger(level=logging.INFO,
                                                  format='%(levelname)s %(message)s'))
        self.dispatcher.gateway_error = exception.GatewayUnavailable([], 5.0)
        self.assertTrue(self.monitor.live()['gateway'].startswith('unavailable: '))
        self.assertIn('INFO monitoring: no gateway is registered', log.output)
        self.assertNotIn('WARNING', log.output)
        self.dispatcher.gateway_error = gateway_down()
        self.assertTrue(self.make_monitor().live()['gateway'].startswith('unavailable: '))
        self.assertIn('WARNING monitoring: the gateway does not answer', log.output)

    def test_answers_are_reused_for_live_max_age(self):
        first = self.monitor.live()
        self.clock.advance(0.1)
        self.assertEqual(first, self.monitor.live())
        self.monitor.connections()
        self.assertEqual({'monitoring': 1, 'gateway_connections': 1}, self.dispatcher.calls)
        self.clock.advance(0.1)  # 0.2 s old: asked again
        self.assertEqual(iso(EPOCH + 0.2), self.monitor.live()['sampled_at'])
        self.assertEqual({'monitoring': 2, 'gateway_connections': 2}, self.dispatcher.calls)

    def test_callers_that_come_while_it_is_asked_wait_for_that_answer(self):
        self.dispatcher.blocked = threading.Event()
        answers, started = [], []

        def ask():
            started[-1].set()
            answers.append(self.monitor.live())
        threads = []
        for _ in range(5):
            started.append(threading.Event())
            threads.append(threading.Thread(target=ask))
            threads[-1].start()
            started[-1].wait(SAFETY_TIMEOUT)
        self.dispatcher.entered.wait(SAFETY_TIMEOUT)
        self.dispatcher.blocked.set()
        for thread in threads:
            thread.join(SAFETY_TIMEOUT)
        self.assertEqual(5, len(answers))
        self.assertEqual(1, self.dispatcher.calls['monitoring'])

    def test_a_failed_answer_is_not_kept(self):
        self.dispatcher.monitoring_error = exception.MessagingError('no dispatcher')
        self.assertRaises(exception.MessagingError, self.monitor.live)
        self.dispatcher.monitoring_error = None
        self.assertEqual(2, len(self.monitor.live()['clouds']))

    def test_an_answer_is_the_callers_to_change(self):
        self.monitor.live()['clouds'][0]['users'] = 1000
        self.assertEqual(2, self.monitor.live()['clouds'][0]['users'])

    def test_the_connections_with_their_durations(self):
        self.clock.advance(0.5)
        connections = self.monitor.connections()
        self.assertEqual(6, len(connections))
        self.assertEqual(dict(connection('10.0.0.1', 'default', 40000),
                              started_at=iso(EPOCH - 30), duration_seconds=30.5),
                         connections[0])
        # The gateway does not know when it started.
        self.assertEqual((None, None), (connections[2]['started_at'],
                                        connections[2]['duration_seconds']))
        self.assertEqual(['10.0.0.3', '10.0.0.4', '10.0.0.5'],
                         [c['client'] for c in self.monitor.connections('edge')])
        self.assertEqual([], self.monitor.connections('default')[3:])
        self.assertRaises(exception.CloudNotFound, self.monitor.connections, 'nowhere')

    def test_the_events_are_the_dispatchers(self):
        self.assertEqual(self.dispatcher.events[:3], self.monitor.events(3))

    def test_the_history_keeps_the_last_samples_oldest_first(self):
        self.conf.set_override('history_length', 3, 'api')
        self.conf.set_override('monitor_interval', 0.5, 'api')
        self.monitor = self.make_monitor()
        for _ in range(5):
            self.monitor.sample()
            self.clock.advance(0.5)
        history = self.monitor.history()
        self.assertEqual(0.5, history['interval'])
        self.assertEqual([iso(EPOCH + t) for t in (1.0, 1.5, 2.0)],
                         [s['at'] for s in history['samples']])
        self.assertEqual({'default': {'connections': 3, 'instances_running': 3, 'users': 2},
                          'edge': {'connections': 3, 'instances_running': 0, 'users': 3}},
                         history['samples'][-1]['clouds'])
        # One reading is one sample, however often it is sampled.
        self.monitor.sample()
        self.monitor.sample()
        self.assertEqual([iso(EPOCH + t) for t in (1.5, 2.0, 2.5)],
                         [s['at'] for s in self.monitor.history()['samples']])

    def test_the_sampler_outlives_every_error(self):
        self.conf.set_override('monitor_interval', 0.1, 'api')
        failures = [exception.MessagingError('no dispatcher'), KeyError('clouds')]
        real = self.dispatcher.monitoring

        def failing_first():
            if failures:
                self.clock.advance(1)
                raise failures.pop(0)
            self.clock.advance(1)
            return real()
        self.dispatcher.monitoring = failing_first
        self.monitor.start()
        self.assertTrue(self.dispatcher.answered.wait(SAFETY_TIMEOUT))
        self.monitor.stop()
        self.assertEqual([], failures)
        self.assertTrue(self.monitor.history()['samples'])

    def test_stop_is_prompt_between_samples(self):
        self.conf.set_override('monitor_interval', 3600, 'api')
        self.monitor.start()
        self.assertTrue(self.dispatcher.answered.wait(SAFETY_TIMEOUT))
        thread = self.monitor._thread
        self.monitor.stop()
        self.assertFalse(thread.is_alive())
        self.assertEqual(1, len(self.monitor.history()['samples']))

    def test_stop_is_prompt_while_the_dispatcher_does_not_answer(self):
        self.dispatcher.blocked = threading.Event()
        self.addCleanup(self.dispatcher.blocked.set)
        self.monitor.start()
        self.assertTrue(self.dispatcher.entered.wait(SAFETY_TIMEOUT))
        sampler = self.monitor._thread
        stopped = threading.Event()
        threading.Thread(target=lambda: (self.monitor.stop(), stopped.set()),
                         daemon=True).start()
        self.assertTrue(stopped.wait(PROMPT), 'stop waits for the question under way')
        # The question is abandoned, not answered: the sampler still waits in it.
        self.assertTrue(sampler.is_alive())
        self.assertFalse(self.dispatcher.answered.is_set())
        self.dispatcher.blocked.set()
        sampler.join(SAFETY_TIMEOUT)
        self.assertFalse(sampler.is_alive())
        self.assertEqual(1, self.dispatcher.calls['monitoring'])  # and asks nothing more

    def test_a_sampler_abandoned_by_stop_ends_even_when_started_again(self):
        self.conf.set_override('monitor_interval', 3600, 'api')
        self.dispatcher.blocked = threading.Event()
        self.addCleanup(self.dispatcher.blocked.set)
        self.monitor.start()
        self.assertTrue(self.dispatcher.entered.wait(SAFETY_TIMEOUT))
        abandoned = self.monitor._thread
        self.monitor.stop()
        self.monitor.start()
        current = self.monitor._thread
        self.assertIsNot(abandoned, current)
        self.dispatcher.blocked.set()
        abandoned.join(SAFETY_TIMEOUT)
        self.assertFalse(abandoned.is_alive())
        self.assertTrue(current.is_alive())  # waiting out its interval
        self.monitor.stop()
        self.assertFalse(current.is_alive())

    def test_with_the_sampler_running_only_it_asks_a_failed_gateway_again(self):
        self.conf.set_override('monitor_interval', 3600, 'api')
        self.dispatcher.gateway_error = gateway_down()
        self.monitor.start()
        self.assertTrue(self.dispatcher.answered.wait(SAFETY_TIMEOUT))
        self.dispatcher.gateway_error = None
        self.clock.advance(monitor_mod.GATEWAY_RETRY + 1)
        self.assertTrue(self.monitor.live()['gateway'].startswith('unavailable: '))
        self.assertEqual(1, self.dispatcher.calls['gateway_connections'])
        self.monitor.sample()  # what the sampler does at its next pass
        self.assertEqual('ok', self.monitor.live()['gateway'])


class MonitoringRoutesTest(test_resources.ApiTestCase):

    def make_dispatcher(self):
        return StubDispatcher()

    def make_monitor(self):
        self.clock = Clock()
        return monitor_mod.Monitor(self.conf, self.dispatcher, clock=self.clock.monotonic,
                                   wall_clock=self.clock.wall)

    def test_live(self):
        body = self.assert_ok(200, self.member.get('/v1/monitoring'))
        self.assertEqual(self.services.monitor.live(), body)
        self.assert_error(401, self.client.get('/v1/monitoring'))

    def test_connections(self):
        body = self.assert_ok(200, self.member.get('/v1/monitoring/connections?cloud=edge'))
        self.assertEqual(['10.0.0.3', '10.0.0.4', '10.0.0.5'],
                         [c['client'] for c in body['connections']])
        self.assertEqual(30.0, body['connections'][0]['duration_seconds'])
        self.assertEqual(('i1', 'web-1'), (body['connections'][0]['instance'],
                                           body['connections'][0]['instance_name']))
        self.assert_error(404, self.member.get('/v1/monitoring/connections?cloud=nowhere'),
                          'cloud nowhere')
        self.assert_error(422, self.member.get('/v1/monitoring/connections?cloud=No_Such'),
                          'cloud')
        self.dispatcher.gateway_error = gateway_down()
        self.clock.advance(1)
        self.assert_error(503, self.member.get('/v1/monitoring/connections'), 'no gateway')
        body = self.assert_ok(200, self.member.get('/v1/monitoring'))
        self.assertIsNone(body['clouds'][0]['users'])

    def test_events(self):
        body = self.assert_ok(200, self.member.get('/v1/monitoring/events?limit=2'))
        self.assertEqual(self.dispatcher.events[:2], body['events'])
        self.assertEqual(10, len(self.assert_ok(200, self.member.get(
            '/v1/monitoring/events'))['events']))
        self.assert_error(422, self.member.get('/v1/monitoring/events?limit=0'), 'limit')
        self.dispatcher.monitoring_error = exception.MessagingError('no dispatcher')
        self.assert_error(503, self.member.get('/v1/monitoring/events'), 'no dispatcher')

    def test_history(self):
        self.services.monitor.sample()
        body = self.assert_ok(200, self.member.get('/v1/monitoring/history'))
        self.assertEqual(self.conf.api.monitor_interval, body['interval'])
        self.assertEqual([iso(EPOCH)], [s['at'] for s in body['samples']])


class PauseAfterTest(base.TestCase):

    def test_a_quick_sample_keeps_the_interval_a_slow_one_waits_longer(self):
        self.assertAlmostEqual(0.9, monitor_mod.pause_after(0.1, 1.0))
        self.assertAlmostEqual(4.0, monitor_mod.pause_after(1.0, 1.0))
        self.assertAlmostEqual(8.0, monitor_mod.pause_after(2.0, 0.5))
