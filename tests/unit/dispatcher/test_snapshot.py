"""The Snapshotter over SQLite, with a fake ComputeAPI that records every call in order."""
import datetime
import threading
import time
import uuid

from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import snapshot as snapshot_mod
from vmcloud.dispatcher import states
from vmcloud.dispatcher import views
from tests import base
from tests.unit.dispatcher import helpers

HOSTS = {'node1': ['vm-a', 'vm-b'], 'node2': ['vm-c']}


class FakeCompute:
    """ComputeAPI's snapshot calls, answering as a healthy host does unless told otherwise.

    ``events`` is every call's start and end, in the order they happened:
    (what, 'start' | 'end', host).
    """

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []
        self.calls: dict[str, list[dict]] = {'freeze': [], 'barrier_and_thaw': [], 'thaw': []}
        self._lock = threading.Lock()
        self.freeze_errors: dict[str, str] = {}  # instance name: its error
        self.raise_on: dict[tuple[str, str], BaseException] = {}  # (what, host): raised
        self.hang_on: set[tuple[str, str]] = set()  # (what, host): never answers in time
        self.barrier_errors: dict[str, str] = {}
        self.thaw_errors: dict[str, str] = {}
        self.slow_freeze: dict[str, threading.Event] = {}  # host: answers once it is set
        self.released = threading.Event()  # ends every hang (at the test's end)
        self.barrier_started = threading.Event()

    def _enter(self, what: str, host: str, **kwargs) -> None:
        with self._lock:
            self.events.append((what, 'start', host))
            self.calls[what].append(dict(host=host, **kwargs))
        if (what, host) in self.hang_on:
            self.released.wait(30)
        if (what, host) in self.raise_on:
            self._leave(what, host)
            raise self.raise_on[what, host]

    def _leave(self, what: str, host: str) -> None:
        with self._lock:
            self.events.append((what, 'end', host))

    def freeze(self, host: str, snapshot_id: str, names: list[str], pause_limit: float,
               timeout: float) -> dict:
        self._enter('freeze', host, snapshot_id=snapshot_id, names=names,
                    pause_limit=pause_limit, timeout=timeout)
        if host in self.slow_freeze:
            self.slow_freeze[host].wait(1)
        answer = {name: ({'error': self.freeze_errors[name]} if name in self.freeze_errors
                         else {'frozen_at': time.time()}) for name in names}
        self._leave('freeze', host)
        return answer

    def barrier_and_thaw(self, host: str, snapshot_id: str, items: list[dict]) -> dict:
        self.barrier_started.set()
        self._enter('barrier_and_thaw', host, snapshot_id=snapshot_id, items=items)
        answer = {item['name']: ({'error': self.barrier_errors[item['name']]}
                                 if item['name'] in self.barrier_errors else
                                 {'pause_ms': 12.5, 'dirty_bytes': 262144,
                                  'thawed_at': time.time()}) for item in items}
        self._leave('barrier_and_thaw', host)
        return answer

    def thaw(self, host: str, snapshot_id: str) -> dict:
        self._enter('thaw', host, snapshot_id=snapshot_id)
        self._leave('thaw', host)
        return {name: self.thaw_errors.get(name, '') for name in HOSTS[host]}

    def hosts_called(self, what: str) -> list[str]:
        return sorted(call['host'] for call in self.calls[what])


class SnapshotterTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('snapshot_freeze_timeout', 5)
        self.conf.set_override('snapshot_pause_limit', 7)
        self.conf.set_override('snapshot_upload_timeout', 600)
        self.configure_database()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)
        self.compute = FakeCompute()
        self.addCleanup(self.compute.released.set)
        self.notified: list[tuple[str, dict]] = []
        self.snapshots = self.snapshotter()
        self.deployment_id = self.create_deployment(HOSTS)
        with self.db.session() as session:
            self.ids = {i.name: i.id for i in db_api.instances_of(session, self.deployment_id)}

    def configure_database(self) -> None:
        """SQLite in the test's state_path (the default)."""

    def snapshotter(self) -> snapshot_mod.Snapshotter:
        return snapshot_mod.Snapshotter(self.conf, self.db, self.compute,
                                        lambda event, payload: self.notified.append(
                                            (event, payload)))

    def create_deployment(self, hosts: dict[str, list[str]],
                          state: str = states.ACTIVE) -> str:
        deployment_id = str(uuid.uuid4())
        with self.db.session() as session:
            db_api.deployment_create(session, id=deployment_id, image='guest:1', count=3,
                                     min_count=3, vcpus=1, memory_mib=64, state=state)
            for host, names in hosts.items():
                for name in names:
                    db_api.instance_create(session, id=str(uuid.uuid4()), name=name,
                                           deployment_id=deployment_id, image='guest:1',
                                           host=host, state=state)
        return deployment_id

    def items(self, snapshot: dict) -> dict[str, dict]:
        """The snapshot's items by instance name."""
        names = {i: n for n, i in self.ids.items()}
        return {names[item['instance_id']]: item for item in snapshot['items']}

    def show(self, snapshot_id: str) -> dict:
        with self.db.session() as session:
            return views.show_snapshot(session, snapshot_id)

    def upload_all(self, snapshot: dict, failing: dict[str, str] | None = None) -> dict:
        """Report every uploading item done (``failing``: name -> error)."""
        failing = failing or {}
        for name, item in self.items(snapshot).items():
            if item['state'] == states.UPLOADING:
                error = failing.get(name, '')
                self.snapshots.item_done(snapshot['id'], item['instance_id'],
                                         '' if error else f'{name}:1', 0 if error else 4096,
                                         error)
        return self.show(snapshot['id'])


class CutTest(SnapshotterTestCase):
    def test_every_instance_freezes_before_any_thaws(self):
        # node1 answers at once, node2 late: no barrier may start before node2 froze.
        self.compute.slow_freeze['node2'] = self.compute.barrier_started
        snapshot = self.snapshots.snapshot(self.deployment_id)
        events = self.compute.events
        freezes_ended = [i for i, e in enumerate(events) if e[:2] == ('freeze', 'end')]
        barriers = [i for i, e in enumerate(events) if e[:2] == ('barrier_and_thaw', 'start')]
        self.assertEqual(2, len(freezes_ended), events)
        self.assertEqual(2, len(barriers), events)
        self.assertLess(max(freezes_ended), min(barriers), events)
        self.assertEqual([], self.compute.calls['thaw'])
        self.assertEqual(states.UPLOADING, snapshot['state'])
        items = self.items(snapshot)
        self.assertEqual({states.UPLOADING}, {i['state'] for i in items.values()})
        self.assertLess(max(i['frozen_at'] for i in items.values()),
                        min(i['thawed_at'] for i in items.values()))

    def test_freeze_gets_the_deadlines_and_the_names_of_its_host(self):
        snapshot = self.snapshots.snapshot(self.deployment_id)
        calls = {c['host']: c for c in self.compute.calls['freeze']}
        self.assertEqual(['vm-a', 'vm-b'], sorted(calls['node1']['names']))
        self.assertEqual(['vm-c'], calls['node2']['names'])
        for call in calls.values():
            self.assertEqual((snapshot['id'], 7, 5),
                             (call['snapshot_id'], call['pause_limit'], call['timeout']))

    def test_each_instance_is_stored_under_its_own_name(self):
        self.snapshots.snapshot(self.deployment_id)
        items = [i for c in self.compute.calls['barrier_and_thaw'] for i in c['items']]
        self.assertEqual(sorted(HOSTS['node1'] + HOSTS['node2']),
                         sorted(i['target'] for i in items))
        for item in items:
            self.assertEqual((self.ids[item['name']], item['name']),
                             (item['instance_id'], item['target']))

    def test_the_barrier_is_recorded_with_an_upload_deadline(self):
        before = models.utcnow()
        snapshot = self.snapshots.snapshot(self.deployment_id)
        after = models.utcnow()
        for item in self.items(snapshot).values():
            self.assertEqual((12.5, 262144), (item['pause_ms'], item['dirty_bytes']))
            self.assertIsInstance(item['frozen_at'], float)
            self.assertIsInstance(item['thawed_at'], float)
            deadline = datetime.datetime.fromisoformat(item['deadline'])
            self.assertTrue(before + datetime.timedelta(seconds=600) <= deadline
                            <= after + datetime.timedelta(seconds=600), item)

    def test_all_uploads_stored_make_it_available(self):
        snapshot = self.upload_all(self.snapshots.snapshot(self.deployment_id))
        self.assertEqual((states.AVAILABLE, ''), (snapshot['state'], snapshot['reason']))
        self.assertEqual(3, len([e for e, _ in self.notified if e == 'snapshot.upload.end']))
        versions, deployment_id = self.snapshots.stored_versions(snapshot['id'])
        self.assertEqual(['vm-a:1', 'vm-b:1', 'vm-c:1'], versions)
        self.assertEqual(self.deployment_id, deployment_id)

    def test_an_upload_that_finished_during_the_barrier_stays_stored(self):
        barrier_and_thaw = self.compute.barrier_and_thaw

        def upload_at_once(host, snapshot_id, items):
            answer = barrier_and_thaw(host, snapshot_id, items)
            for item in items:
                self.snapshots.item_done(snapshot_id, item['instance_id'],
                                         f'{item["name"]}:1', 1, '')
            return answer
        self.compute.barrier_and_thaw = upload_at_once
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.assertEqual(states.AVAILABLE, snapshot['state'])
        self.assertEqual({states.AVAILABLE}, {i['state'] for i in snapshot['items']})

    def test_an_upload_stored_while_its_barrier_answer_was_late_stays_stored(self):
        # node2 took its barrier and stored vm-c, but answered after the dispatcher
        # stopped waiting (pause_limit): what its upload reported holds.
        self.conf.set_override('snapshot_pause_limit', 1)
        barrier_and_thaw = self.compute.barrier_and_thaw

        def late_on_node2(host, snapshot_id, items):
            answer = barrier_and_thaw(host, snapshot_id, items)
            if host == 'node2':
                self.snapshots.item_done(snapshot_id, self.ids['vm-c'], 'vm-c:1', 1, '')
                self.compute.released.wait(30)
            return answer
        self.compute.barrier_and_thaw = late_on_node2
        snapshot = self.snapshots.snapshot(self.deployment_id)
        items = self.items(snapshot)
        self.assertEqual((states.AVAILABLE, 'vm-c:1'),
                         (items['vm-c']['state'], items['vm-c']['version']))
        self.assertEqual(states.AVAILABLE, self.upload_all(snapshot)['state'])

    def test_one_barrier_at_a_time_per_deployment(self):
        with self.db.session() as session:
            db_api.snapshot_create(session, id='s-busy', deployment_id=self.deployment_id,
                                   state=states.FREEZING)
        error = self.assertRaises(exception.InvalidRequest, self.snapshots.snapshot,
                                  self.deployment_id)
        self.assertIn('s-busy', str(error))
        self.assertEqual([], self.compute.calls['freeze'])

    def test_nothing_to_snapshot(self):
        self.assertRaises(exception.DeploymentNotFound, self.snapshots.snapshot, 'nope')
        idle = self.create_deployment({'node1': ['vm-x']}, state=states.ERROR)
        error = self.assertRaises(exception.InvalidRequest, self.snapshots.snapshot, idle)
        self.assertIn('no active instance', str(error))
        self.assertEqual([], self.snapshots.list())


class AbortTest(SnapshotterTestCase):
    def assert_aborted(self, snapshot: dict, failed: list[str], why: str) -> dict[str, dict]:
        self.assertEqual([], self.compute.calls['barrier_and_thaw'])
        self.assertEqual(['node1', 'node2'], self.compute.hosts_called('thaw'))
        self.assertEqual(states.ERROR, snapshot['state'])
        self.assertTrue(snapshot['reason'].startswith('aborted: '), snapshot['reason'])
        items = self.items(snapshot)
        for name, item in items.items():
            self.assertEqual((states.ERROR, ''), (item['state'], item['version']))
            if name in failed:
                self.assertIn(why, item['reason'])
                self.assertIn(f'{name}: {item["reason"]}', snapshot['reason'])
            else:
                self.assertEqual(f'aborted: {", ".join(failed)} did not freeze',
                                 item['reason'])
        self.assertEqual(snapshot, self.show(snapshot['id']))
        self.assertRaises(exception.InvalidRequest, self.snapshots.stored_versions,
                          snapshot['id'], allow_partial=True)
        return items

    def test_one_failed_freeze_thaws_every_host(self):
        self.compute.freeze_errors['vm-c'] = 'vm-c cannot freeze, on purpose'
        snapshot = self.snapshots.snapshot(self.deployment_id)
        items = self.assert_aborted(snapshot, ['vm-c'], 'freeze on node2: vm-c cannot freeze')
        self.assertIn('every frozen guest thawed', snapshot['reason'])
        self.assertIsInstance(items['vm-a']['frozen_at'], float)
        self.assertIsNone(items['vm-c']['frozen_at'])

    def test_a_host_that_cannot_be_reached_aborts(self):
        self.compute.raise_on['freeze', 'node1'] = exception.MessagingError(
            'the compute manager node1 did not answer freeze in time: is it running?')
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.assert_aborted(snapshot, ['vm-a', 'vm-b'], 'freeze on node1: the compute manager '
                                                        'node1 did not answer freeze in time')

    def test_a_host_silent_past_the_freeze_timeout_aborts(self):
        self.conf.set_override('snapshot_freeze_timeout', 1)
        self.compute.hang_on.add(('freeze', 'node2'))
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.assert_aborted(snapshot, ['vm-c'],
                            'compute host node2 did not answer freeze within 1 s')

    def test_a_reason_too_long_for_its_column_is_cut(self):
        self.compute.freeze_errors['vm-c'] = 'x' * 5000
        snapshot = self.snapshots.snapshot(self.deployment_id)
        for reason in [snapshot['reason']] + [i['reason'] for i in snapshot['items']]:
            self.assertLessEqual(len(reason), snapshot_mod.REASON_LENGTH)
        reason = self.items(snapshot)['vm-c']['reason']
        self.assertEqual(snapshot_mod.REASON_LENGTH, len(reason))
        self.assertTrue(reason.endswith('x...'), reason)

    def test_a_failed_thaw_says_the_guests_thaw_themselves(self):
        self.compute.freeze_errors['vm-c'] = 'on purpose'
        self.compute.thaw_errors['vm-a'] = 'cannot resume vm-a'
        self.compute.raise_on['thaw', 'node2'] = exception.MessagingError('node2 is gone')
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.assert_aborted(snapshot, ['vm-c'], 'on purpose')
        self.assertIn('not thawed (they thaw themselves within 7 s): '
                      'vm-a on node1: cannot resume vm-a; every guest on node2: node2 is gone',
                      snapshot['reason'])

    def test_a_bug_mid_barrier_still_thaws_and_ends_the_snapshot(self):
        self.compute.raise_on['barrier_and_thaw', 'node2'] = RuntimeError('a bug')
        self.assertRaises(RuntimeError, self.snapshots.snapshot, self.deployment_id)
        self.assertEqual(['node1', 'node2'], self.compute.hosts_called('thaw'))
        snapshot, = self.snapshots.list(self.deployment_id)
        self.assertEqual(states.ERROR, snapshot['state'])
        self.assertIn('snapshot failed: RuntimeError: a bug', snapshot['reason'])


class PartialTest(SnapshotterTestCase):
    def partial(self) -> dict:
        """vm-b's barrier fails, vm-c's upload fails, vm-a is stored."""
        self.compute.barrier_errors['vm-b'] = 'no mirror for vm-b'
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.assertEqual(states.UPLOADING, snapshot['state'])
        items = self.items(snapshot)
        self.assertEqual((states.ERROR, 'barrier_and_thaw on node1: no mirror for vm-b'),
                         (items['vm-b']['state'], items['vm-b']['reason']))
        self.assertIsNone(items['vm-b']['thawed_at'])
        return self.upload_all(snapshot, {'vm-c': 'StorageError: the warehouse is full'})

    def test_the_reason_names_each_missing_instance_and_why(self):
        snapshot = self.partial()
        self.assertEqual(states.PARTIAL, snapshot['state'])
        self.assertEqual('2 instances could not be snapshotted: '
                         'vm-b: barrier_and_thaw on node1: no mirror for vm-b; '
                         'vm-c: StorageError: the warehouse is full', snapshot['reason'])

    def test_deploying_a_partial_snapshot_needs_allow_partial(self):
        snapshot = self.partial()
        error = self.assertRaises(exception.InvalidRequest, self.snapshots.stored_versions,
                                  snapshot['id'])
        self.assertIn('is partial', str(error))
        self.assertIn('vm-b: barrier_and_thaw on node1: no mirror for vm-b', str(error))
        self.assertIn('vm-c: StorageError', str(error))
        self.assertIn('--allow-partial', str(error))
        self.assertEqual((['vm-a:1'], self.deployment_id),
                         self.snapshots.stored_versions(snapshot['id'], allow_partial=True))

    def test_an_instance_whose_host_is_silent_is_missing_by_name(self):
        with self.db.session() as session:
            db_api.instance_lock(session, self.ids['vm-c']).state = states.UNKNOWN
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.assertEqual(['node1'], self.compute.hosts_called('freeze'))
        self.assertEqual((states.ERROR, 'not snapshotted: its host node2 stopped reporting'),
                         (self.items(snapshot)['vm-c']['state'],
                          self.items(snapshot)['vm-c']['reason']))
        snapshot = self.upload_all(snapshot)
        self.assertEqual(states.PARTIAL, snapshot['state'])
        self.assertIn('vm-c: not snapshotted: its host node2 stopped reporting',
                      snapshot['reason'])

    def test_unfinished_failed_or_unknown_snapshots_are_not_deployed(self):
        snapshot = self.snapshots.snapshot(self.deployment_id)
        error = self.assertRaises(exception.InvalidRequest, self.snapshots.stored_versions,
                                  snapshot['id'], allow_partial=True)
        self.assertIn('still uploading', str(error))
        snapshot = self.upload_all(snapshot, {n: 'on purpose' for n in self.ids})
        self.assertEqual(states.ERROR, snapshot['state'])
        error = self.assertRaises(exception.InvalidRequest, self.snapshots.stored_versions,
                                  snapshot['id'], allow_partial=True)
        self.assertIn('failed and stored nothing', str(error))
        self.assertRaises(exception.InvalidRequest, self.snapshots.stored_versions, 'nope')


class ExpireTest(SnapshotterTestCase):
    def test_uploads_past_their_deadline_end_in_error(self):
        snapshot = self.snapshots.snapshot(self.deployment_id)
        self.snapshots.item_done(snapshot['id'], self.ids['vm-a'], 'vm-a:1', 1, '')
        deadline = datetime.datetime.fromisoformat(self.items(snapshot)['vm-b']['deadline'])
        self.assertEqual([], self.snapshots.expire(deadline - datetime.timedelta(seconds=1)))
        self.assertEqual(states.UPLOADING, self.show(snapshot['id'])['state'])

        ended = self.snapshots.expire(deadline + datetime.timedelta(seconds=1))

        self.assertEqual(sorted([(snapshot['id'], self.ids['vm-b']),
                                 (snapshot['id'], self.ids['vm-c'])]), sorted(ended))
        shown = self.show(snapshot['id'])
        self.assertEqual(states.PARTIAL, shown['state'])
        items = self.items(shown)
        self.assertEqual(states.AVAILABLE, items['vm-a']['state'])
        for name in ('vm-b', 'vm-c'):
            self.assertEqual((states.ERROR, 'upload did not finish within 600 s'),
                             (items[name]['state'], items[name]['reason']))
            self.assertIn(f'{name}: upload did not finish within 600 s', shown['reason'])
        # A late report does not bring back what was given up.
        self.snapshots.item_done(snapshot['id'], self.ids['vm-b'], 'vm-b:1', 1, '')
        self.assertEqual(shown, self.show(snapshot['id']))
        self.assertEqual([], self.snapshots.expire(deadline + datetime.timedelta(seconds=1)))

    def test_a_barrier_the_database_failed_to_record_ends_by_its_deadline(self):
        def database_away(*args):
            raise exception.DatabaseError('the database went away, on purpose')
        self.snapshots._record = database_away
        self.snapshots._end_freezing = database_away
        before = models.utcnow()
        self.assertRaises(exception.DatabaseError, self.snapshots.snapshot, self.deployment_id)
        stuck, = self.snapshots.list(self.deployment_id)
        self.assertEqual(states.FREEZING, stuck['state'])
        self.assertEqual(['node1', 'node2'], self.compute.hosts_called('thaw'))
        seconds = 2 * 5 + 7 + self.conf.rpc_call_timeout
        self.assertEqual([], self.snapshots.expire(before + datetime.timedelta(seconds=seconds)))

        ended = self.snapshots.expire(models.utcnow() + datetime.timedelta(seconds=seconds))

        self.assertEqual(sorted((stuck['id'], i) for i in self.ids.values()), sorted(ended))
        shown = self.show(stuck['id'])
        self.assertEqual(states.ERROR, shown['state'])
        self.assertEqual({(states.ERROR, f'no barrier recorded within {seconds} s')},
                         {(i['state'], i['reason']) for i in shown['items']})
        self.snapshotter().snapshot(self.deployment_id)  # no longer "being snapshotted"


class RecoverTest(SnapshotterTestCase):
    def test_a_barrier_the_dispatcher_did_not_finish_ends_in_error(self):
        uploading = self.snapshots.snapshot(self.deployment_id)
        with self.db.session() as session:
            # What a dispatcher killed mid-barrier leaves: an old one's state, or this one's.
            for snapshot_id, state in (('s-old', states.UPLOADING), ('s-new', states.FREEZING)):
                db_api.snapshot_create(session, id=snapshot_id,
                                       deployment_id=self.deployment_id, state=state)
                for instance_id in self.ids.values():
                    db_api.snapshot_item_create(session, snapshot_id=snapshot_id,
                                                instance_id=instance_id,
                                                state=states.FREEZING)

        self.assertEqual(['s-new', 's-old'], sorted(self.snapshotter().recover()))

        for snapshot_id in ('s-old', 's-new'):
            shown = self.show(snapshot_id)
            self.assertEqual(states.ERROR, shown['state'])
            self.assertIn('vm-a: dispatcher restarted during the barrier', shown['reason'])
            self.assertEqual({(states.ERROR, 'dispatcher restarted during the barrier')},
                             {(i['state'], i['reason']) for i in shown['items']})
        # Uploads in flight are left to their reports and deadlines.
        self.assertEqual(uploading, self.show(uploading['id']))
        self.assertEqual([], self.snapshotter().recover())


class ListTest(SnapshotterTestCase):
    def test_newest_first_by_deployment(self):
        other = self.create_deployment({'node2': ['vm-z']})
        now = models.utcnow()
        with self.db.session() as session:
            for age, snapshot_id, deployment_id in ((3, 's-1', self.deployment_id),
                                                    (2, 's-2', other),
                                                    (1, 's-3', self.deployment_id)):
                db_api.snapshot_create(session, id=snapshot_id, deployment_id=deployment_id,
                                       state=states.AVAILABLE,
                                       created_at=now - datetime.timedelta(minutes=age))
        self.assertEqual(['s-3', 's-2', 's-1'], [s['id'] for s in self.snapshots.list()])
        listed = self.snapshots.list(self.deployment_id)
        self.assertEqual(['s-3', 's-1'], [s['id'] for s in listed])
        self.assertEqual({'id', 'deployment_id', 'state', 'reason', 'created_at',
                          'replicated', 'persistent'}, set(listed[0]))
        self.assertRaises(exception.DeploymentNotFound, self.snapshots.list, 'nope')


class OnPostgres:
    """The same on PostgreSQL, where the row locks and the column lengths are real."""

    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_snapshot')


class CutPostgresTest(OnPostgres, CutTest):
    pass


class AbortPostgresTest(OnPostgres, AbortTest):
    pass


class PartialPostgresTest(OnPostgres, PartialTest):
    pass


class ExpirePostgresTest(OnPostgres, ExpireTest):
    pass


class RecoverPostgresTest(OnPostgres, RecoverTest):
    pass
