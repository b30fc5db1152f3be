"""Connection records, per-cloud stats and the counters of past HAProxy runs, from
HAProxy's answers as the runtime API parses them."""
import json
import os

from vmcloud import exception
from vmcloud.gateway import accounting
from vmcloud.gateway import haproxy
from tests import base

TABLE = '''# table: st_conns, type: string, size:204800, used:4
0x55a367e0b0b0: key=10.0.0.7:47734>22000 use=1 exp=9997 conn_cur=1 gpt0=1700000001 gpt1=0
0x55a367e0cb30: key=10.0.0.7:56746>21000 use=1 exp=9999 conn_cur=1 gpt0=1700000002 gpt1=2
0x55a367e13090: key=2001:db8::9:56754>21000 use=1 exp=9999 conn_cur=1 gpt0=1700000003 gpt1=0
0x55a367e0a8e0: key=10.0.0.8:60676>21999 use=1 exp=8877 conn_cur=1 gpt0=1700000004 gpt1=1
'''
SESSIONS = '''0x55a367d07130: proto=tcpv4 src=10.0.0.7:47734 fe=fe_tcp be=tcp_slot0 srv=i-t1 ts=00 \
epoch=0x1 age=0s calls=2 rate=0 cpu=0 lat=0 rq[f=848000h,i=0,an=00h,rx=59m59s,wx=,ax=] exp=4s
0x55a367e0cfc0: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 epoch=0x1
'''


def server(backend, ident, name):
    return haproxy.Server(backend=backend, id=ident, name=name, address='10.1.0.2',
                          port=80, op_state=2, admin_state=0, weight=10, check_status=6)


SERVERS = {'http_slot0': {'i-h1': server('http_slot0', 1, 'i-h1'),
                          'i-h2': server('http_slot0', 2, 'i-h2')},
           'tcp_slot0': {'i-t1': server('tcp_slot0', 1, 'i-t1')}}
SLOTS = {'21000': 'http_slot0', '22000': 'tcp_slot0'}


def listener(deployment, cloud, application, port, instances):
    return {'deployment': deployment, 'cloud': cloud, 'application': application,
            'listener_port': port, 'protocol': 'http', 'port': 80,
            'network': {'id': 'n', 'vni': 5, 'cidr': '10.1.0.0/24'}, 'peers': [],
            'instances': [{'id': i, 'name': f'{deployment}-{n}', 'host': 'h',
                           'address': '10.1.0.2', 'state': 'active'}
                          for n, i in enumerate(instances, 1)]}


STATE = {'clouds': {'c1': {'connection_limit': 10}, 'c2': {'connection_limit': 4},
                    'empty': {'connection_limit': 7}},
         'applications': {'web': {'connection_limit': None}},
         'hosts': {},
         'listeners': [listener('d-web', 'c1', 'web', 21000, ['i-h1', 'i-h2']),
                       listener('d-tcp', 'c2', None, 22000, ['i-t1']),
                       listener('d-none', 'c2', 'idle', 21500, [])]}


def rows(text):
    return [haproxy.parse_table_entry(line) for line in text.splitlines()
            if line.startswith('0x')]


class ParseTest(base.TestCase):
    def test_a_table_entry(self):
        self.assertEqual({'key': '10.0.0.7:56746>21000', 'use': 1, 'exp': 9999,
                          'conn_cur': 1, 'gpt0': 1700000002, 'gpt1': 2},
                         rows(TABLE)[1])
        self.assertEqual({'key': 'c1', 'use': 0, 'exp': 0, 'conn_cnt': 4},
                         haproxy.parse_table_entry('0x1: key=c1 use=0 exp=0 conn_cnt=4'))

    def test_a_session(self):
        session = haproxy.parse_session(SESSIONS.splitlines()[0])
        self.assertEqual(('10.0.0.7:47734', 'fe_tcp', 'tcp_slot0', 'i-t1'),
                         (session['src'], session['fe'], session['be'], session['srv']))
        self.assertNotIn('rq[f', session)

    def test_connection_keys(self):
        self.assertEqual(('10.0.0.7', 5, 21000),
                         accounting.split_connection_key('10.0.0.7:5>21000'))
        self.assertEqual(('2001:db8::9', 56754, 21000),
                         accounting.split_connection_key('2001:db8::9:56754>21000'))
        self.assertRaises(ValueError, accounting.split_connection_key, 'c1')


class ConnectionsTest(base.TestCase):
    def records(self, **kwargs):
        sessions = [haproxy.parse_session(line) for line in SESSIONS.splitlines()]
        return accounting.connections(rows(TABLE), sessions, SERVERS, STATE['listeners'],
                                      SLOTS, **kwargs)

    def test_each_connection_names_its_client_listener_and_instance(self):
        self.assertEqual([
            {'client': '10.0.0.7', 'client_port': 56746, 'cloud': 'c1', 'application': 'web',
             'deployment': 'd-web', 'instance': 'i-h1', 'instance_name': 'd-web-1',
             'listener_port': 21000, 'started_at': 1700000002},
            # An HTTP connection before its first answer: no instance yet.
            {'client': '2001:db8::9', 'client_port': 56754, 'cloud': 'c1',
             'application': 'web', 'deployment': 'd-web', 'instance': None,
             'instance_name': None, 'listener_port': 21000, 'started_at': 1700000003},
            # A TCP stream names its server.
            {'client': '10.0.0.7', 'client_port': 47734, 'cloud': 'c2', 'application': None,
             'deployment': 'd-tcp', 'instance': 'i-t1', 'instance_name': 'd-tcp-1',
             'listener_port': 22000, 'started_at': 1700000001},
        ], self.records())

    def test_an_instance_that_left_its_listener_has_no_name(self):
        # Taken out of the state (deleted, rebuilt), its server still holds connections.
        listeners = [dict(lst, instances=[i for i in lst['instances'] if i['id'] != 'i-h1'])
                     for lst in STATE['listeners']]
        sessions = [haproxy.parse_session(line) for line in SESSIONS.splitlines()]
        records = accounting.connections(rows(TABLE), sessions, SERVERS, listeners, SLOTS)
        self.assertEqual([('i-h1', None), (None, None), ('i-t1', 'd-tcp-1')],
                         [(r['instance'], r['instance_name']) for r in records])

    def test_one_cloud(self):
        self.assertEqual({'c2'}, {r['cloud'] for r in self.records(cloud='c2')})
        self.assertEqual([], self.records(cloud='empty'))

    def test_closed_entries_and_gone_listeners_are_left_out(self):
        table = rows(TABLE)
        table[0]['conn_cur'] = 0
        records = accounting.connections(table, [], SERVERS, STATE['listeners'], SLOTS)
        self.assertNotIn(47734, [r['client_port'] for r in records])
        self.assertNotIn(21999, [r['listener_port'] for r in records])


class StatsTest(base.TestCase):
    CLOUD_ROWS = [{'key': 'c1', 'conn_cur': 2, 'conn_cnt': 40, 'bytes_in_cnt': 100,
                   'bytes_out_cnt': 900},
                  {'key': 'c2', 'conn_cur': 1, 'conn_cnt': 3, 'bytes_in_cnt': 5,
                   'bytes_out_cnt': 6}]
    REJECT_ROWS = [{'key': 'c2', 'conn_cnt': 9}]

    def test_run_counters(self):
        self.assertEqual(
            {'c1': {'total_connections': 40, 'rejected_connections': 0, 'bytes_in': 100,
                    'bytes_out': 900},
             'c2': {'total_connections': 3, 'rejected_connections': 9, 'bytes_in': 5,
                    'bytes_out': 6}},
            accounting.run_counters(self.CLOUD_ROWS, self.REJECT_ROWS))

    def test_per_cloud(self):
        records = accounting.connections(rows(TABLE), [], SERVERS, STATE['listeners'], SLOTS)
        totals = {'c1': {'total_connections': 45, 'rejected_connections': 1,
                         'bytes_in': 1, 'bytes_out': 2}}
        stats = accounting.cloud_stats(STATE, records, self.CLOUD_ROWS, totals)
        self.assertEqual({
            'cloud': 'c1', 'connection_limit': 10, 'applications_deployed': 1,
            'applications_running': 1, 'users_connected': 2, 'active_connections': 2,
            'available_connections': 8, 'total_connections': 45, 'rejected_connections': 1,
            'bytes_in': 1, 'bytes_out': 2, 'per_instance': {'i-h1': 1, 'i-h2': 0}},
            stats['c1'])
        self.assertEqual((2, 1, 3), (stats['c2']['applications_deployed'],
                                     stats['c2']['applications_running'],
                                     stats['c2']['available_connections']))
        self.assertEqual({'i-t1': 0}, stats['c2']['per_instance'])  # no stream: unknown
        self.assertEqual((0, 7, 0), (stats['empty']['active_connections'],
                                     stats['empty']['available_connections'],
                                     stats['empty']['total_connections']))

    def test_one_cloud_and_an_unknown_one(self):
        self.assertEqual(['c2'], list(accounting.cloud_stats(STATE, [], [], {}, cloud='c2')))
        error = self.assertRaises(exception.CloudNotFound, accounting.cloud_stats, STATE, [],
                                  [], {}, cloud='nope')
        self.assertEqual('nope', error.name)

    def test_available_is_never_negative(self):
        # A limit lowered below what is open: nothing more is admitted.
        rows_over = [{'key': 'c2', 'conn_cur': 6}]
        stats = accounting.cloud_stats(STATE, [], rows_over, {}, cloud='c2')
        self.assertEqual(0, stats['c2']['available_connections'])


def counts(total, rejected=0, bytes_in=0, bytes_out=0):
    return {'total_connections': total, 'rejected_connections': rejected,
            'bytes_in': bytes_in, 'bytes_out': bytes_out}


class CountersTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.tmp, 'gw', 'counters.json')

    def test_totals_go_on_across_runs(self):
        counters = accounting.Counters(self.path)
        self.assertEqual({'c1': counts(3, 1)}, counters.update('100-1', {'c1': counts(3, 1)}))
        self.assertEqual({'c1': counts(5, 1)}, counters.update('100-1', {'c1': counts(5, 1)}))
        # HAProxy started again: it counts from zero; the last run's totals stay.
        self.assertEqual({'c1': counts(7, 1), 'c2': counts(1)},
                         counters.update('200-9', {'c1': counts(2), 'c2': counts(1)}))
        # Another gateway process reading the same file (a restart) sees the same.
        again = accounting.Counters(self.path)
        self.assertEqual({'c1': counts(8, 1), 'c2': counts(1)},
                         again.update('200-9', {'c1': counts(3), 'c2': counts(1)}))
        # Same pid, other start time: another run.
        self.assertEqual({'c1': counts(9, 1), 'c2': counts(1)},
                         again.update('200-10', {'c1': counts(1)}))

    def test_the_file_is_written_whole(self):
        accounting.Counters(self.path).update('1-1', {'c1': counts(1)})
        with open(self.path) as f:
            data = json.load(f)
        self.assertEqual('1-1', data['run'])
        self.assertEqual([], [name for name in os.listdir(os.path.dirname(self.path))
                              if name != 'counters.json'])

    def test_an_unreadable_file_is_an_error(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, 'w') as f:
            f.write('{not json')
        error = self.assertRaises(exception.GatewayError,
                                  accounting.Counters(self.path).update, '1-1', {})
        self.assertIn(self.path, str(error))
