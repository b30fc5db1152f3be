"""Snapshots of whole deployments: one cut across hosts, then uploads per instance.

The cut: every instance of the deployment is frozen, all hosts at once, before any
thaws. A freeze that fails, or a host that does not answer within [DEFAULT]
snapshot_freeze_timeout, aborts the snapshot: every host is told to thaw, and a guest
that never hears it (the dispatcher died, the network was cut) thaws itself after
snapshot_pause_limit, on its compute host's own clock. Once all froze, each host takes
its mirrors' barriers, thaws, and uploads in the background, every instance's version
stored under the instance's own name (a new image whose parent is the version it was
deployed from: deploying the base image still means the base).

A snapshot always ends available, partial (its reason names each missing instance and
why) or error: barriers and uploads have deadlines (``expire``), and a barrier the
dispatcher did not live to finish is ended by ``recover`` when it starts again.

An item stored is ``replicated``: deployable. With the peer exchange its new chunks may
be on their owners among the compute nodes only, written to the repository in the
background; it is ``persistent`` once the repository holds every chunk of its version.
The warehouse says so (``Warehouse.is_whole``), asked when an upload or its host's
persister says it is done and whenever a snapshot not yet persistent is shown or listed,
so no lost report (its host died) leaves it wrong; the true answer is kept in the row.
"""
import collections
import concurrent.futures
import datetime
import logging
import threading
import uuid
from typing import Callable

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.dispatcher import states
from vmcloud.dispatcher import transitions
from vmcloud.dispatcher import views
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

# The reason columns' length: PostgreSQL refuses a longer string, a compute host's error
# text has no bound.
REASON_LENGTH = 2000
PENDING = (states.FREEZING, states.UPLOADING)
RESTARTED = 'dispatcher restarted during the barrier'
# Versions known whole, remembered up to this many (then forgotten and asked again).
WHOLE_KEPT = 65536


def clip(reason: str) -> str:
    """``reason`` cut to fit a reason column, marked as cut."""
    if len(reason) <= REASON_LENGTH:
        return reason
    return reason[:REASON_LENGTH - 3] + '...'


class Snapshotter:
    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database,
                 compute: compute_rpcapi.ComputeAPI, notify: Callable[[str, dict], None],
                 warehouse: warehouse_mod.Warehouse | None = None):
        """``warehouse``: where persistence is checked; without it the hosts' reports
        are taken as they come."""
        self.conf = conf
        self.db = db
        self.compute = compute
        self.notify = notify
        self.warehouse = warehouse
        self._whole: set[manifest_mod.VersionRef] = set()
        self._whole_lock = threading.Lock()

    # -- the cut -----------------------------------------------------------------

    def snapshot(self, deployment_id: str) -> dict:
        """Freeze every active instance of the deployment, then barrier and thaw them all,
        then upload; answers once every guest runs again (the uploads go on). An instance
        whose host stopped reporting (unknown) is an item in error: the snapshot lacks it.

        :returns: the snapshot as ``show_snapshot`` shows it: freezing failed (error,
            every guest thawed), or uploading, partial, available.
        :raises: DeploymentNotFound; InvalidRequest if none of its instances is active
            or another snapshot of it is still freezing.
        """
        snapshot_id = str(uuid.uuid4())
        with self.db.session() as session:
            # Locked: two requests at once must not both find no barrier under way.
            views.deployment(session, deployment_id, lock=True)
            busy = [s.id for s in db_api.snapshots(session, deployment_id)
                    if s.state == states.FREEZING]
            if busy:
                raise exception.InvalidRequest(
                    f'deployment {deployment_id} is being snapshotted ({busy[0]}): '
                    f'one barrier at a time')
            instances = db_api.instances_of(session, deployment_id)
            active = [i for i in instances if i.state == states.ACTIVE]
            if not active:
                raise exception.InvalidRequest(
                    f'deployment {deployment_id} has no active instance to snapshot')
            db_api.snapshot_create(session, id=snapshot_id, deployment_id=deployment_id,
                                   state=states.FREEZING)
            for instance in instances:
                if instance.state == states.UNKNOWN:
                    # It may run on, but nothing can freeze it: the snapshot lacks it, and
                    # says so (partial), rather than pass for the whole deployment.
                    db_api.snapshot_item_create(
                        session, snapshot_id=snapshot_id, instance_id=instance.id,
                        state=states.ERROR,
                        reason=f'not snapshotted: its host {instance.host} stopped reporting')
            by_host: dict[str, list[dict]] = collections.defaultdict(list)
            # Past it, the request that froze them ended without recording their barrier
            # (the database failed it): their guests thawed themselves, and the deployment
            # must not stay "being snapshotted".
            deadline = models.utcnow() + datetime.timedelta(
                seconds=dispatcher_rpcapi.snapshot_seconds(self.conf))
            for instance in active:
                db_api.snapshot_item_create(session, snapshot_id=snapshot_id,
                                            instance_id=instance.id, state=states.FREEZING,
                                            deadline=deadline)
                by_host[instance.host].append({'instance_id': instance.id,
                                               'name': instance.name,
                                               'target': instance.name})
        LOG.info('snapshot %s of deployment %s: freezing %d instances on %d hosts',
                 snapshot_id, deployment_id, len(active), len(by_host))
        try:
            return self._cut(snapshot_id, dict(by_host))
        except BaseException as exc:
            # A bug here must not leave guests paused nor the snapshot freezing for ever.
            LOG.exception('snapshot %s failed', snapshot_id)
            self._on_every_host('thaw', lambda host: self.compute.thaw(host, snapshot_id),
                                by_host, self.conf.snapshot_freeze_timeout)
            self._end_freezing(snapshot_id, f'snapshot failed: {type(exc).__name__}: {exc}')
            raise

    def _cut(self, snapshot_id: str, by_host: dict[str, list[dict]]) -> dict:
        timeout = self.conf.snapshot_freeze_timeout
        pause_limit = self.conf.snapshot_pause_limit
        answers = self._on_every_host(
            'freeze', lambda host: self.compute.freeze(
                host, snapshot_id, [i['name'] for i in by_host[host]],
                pause_limit=pause_limit, timeout=timeout),
            by_host, timeout)
        frozen = self._per_instance(by_host, answers, 'freeze', 'frozen_at')
        failed = {name: result['error'] for name, result in frozen.items() if 'error' in result}
        if failed:
            return self._abort(snapshot_id, by_host, frozen, failed)
        LOG.info('snapshot %s: every instance frozen; barrier and thaw', snapshot_id)
        # Past pause_limit the guests thawed themselves: a later answer is no cut.
        answers = self._on_every_host(
            'barrier_and_thaw',
            lambda host: self.compute.barrier_and_thaw(host, snapshot_id, by_host[host]),
            by_host, pause_limit)
        thawed = self._per_instance(by_host, answers, 'barrier_and_thaw', 'thawed_at')
        return self._record(snapshot_id, by_host, frozen, thawed)

    def _on_every_host(self, what: str, call: Callable[[str], dict], hosts,
                       timeout: float) -> dict[str, dict | exception.VmcloudError]:
        """``call(host)`` on every host at once, waiting ``timeout`` s for them all.

        :returns: {host: its answer, or the VmcloudError it raised, or one saying it did
            not answer within ``timeout`` s}.
        """
        bound = rpc.with_current_request(call)
        pool = concurrent.futures.ThreadPoolExecutor(max(1, len(hosts)),
                                                     thread_name_prefix=f'snapshot-{what}')
        try:
            futures = {host: pool.submit(bound, host) for host in hosts}
            concurrent.futures.wait(futures.values(), timeout)
        finally:
            # Not joined: a host that did not answer must not hold up the snapshot; its
            # call ends in its thread by its own RPC timeout.
            pool.shutdown(wait=False)
        answers: dict[str, dict | exception.VmcloudError] = {}
        for host, future in futures.items():
            if not future.done():
                answers[host] = exception.MessagingError(
                    f'compute host {host} did not answer {what} within {timeout:g} s')
                continue
            try:
                answers[host] = future.result()
            except exception.VmcloudError as exc:
                answers[host] = exc
        return answers

    @staticmethod
    def _per_instance(by_host: dict[str, list[dict]],
                      answers: dict[str, dict | exception.VmcloudError], what: str,
                      field: str) -> dict[str, dict]:
        """{instance name: its host's answer for it, or {'error': why there is none}}."""
        results = {}
        for host, items in by_host.items():
            answer = answers[host]
            for item in items:
                name = item['name']
                if isinstance(answer, exception.VmcloudError):
                    results[name] = {'error': f'{what} on {host}: {answer}'}
                    continue
                result = answer.get(name) if isinstance(answer, dict) else None
                if isinstance(result, dict) and result.get('error'):
                    results[name] = {'error': f'{what} on {host}: {result["error"]}'}
                elif isinstance(result, dict) and field in result:
                    results[name] = result
                elif result is None:
                    results[name] = {'error': f'{what} on {host}: it answered nothing for '
                                              f'{name}'}
                else:
                    results[name] = {'error': f'{what} on {host}: unexpected answer for '
                                              f'{name}: {result!r}'}
        return results

    def _abort(self, snapshot_id: str, by_host: dict[str, list[dict]],
               frozen: dict[str, dict], failed: dict[str, str]) -> dict:
        """Thaw every host, end every item and the snapshot in error."""
        LOG.error('snapshot %s aborted: %s', snapshot_id,
                  '; '.join(f'{name}: {error}' for name, error in sorted(failed.items())))
        answers = self._on_every_host('thaw', lambda host: self.compute.thaw(host, snapshot_id),
                                      by_host, self.conf.snapshot_freeze_timeout)
        not_thawed = []
        for host, answer in sorted(answers.items()):
            errors = ({'every guest': str(answer)} if isinstance(answer, exception.VmcloudError)
                      else {name: error for name, error in answer.items() if error})
            for name, error in sorted(errors.items()):
                LOG.error('snapshot %s: cannot thaw %s on %s: %s', snapshot_id, name, host,
                          error)
                not_thawed.append(f'{name} on {host}: {error}')
        who = ', '.join(sorted(failed))
        reason = 'aborted: ' + '; '.join(
            f'{name}: {error}' for name, error in sorted(failed.items()))
        if not_thawed:
            reason += (f'; not thawed (they thaw themselves within '
                       f'{self.conf.snapshot_pause_limit} s): ' + '; '.join(not_thawed))
        else:
            reason += '; every frozen guest thawed'
        with self.db.session() as session:
            db_api.snapshot_get(session, snapshot_id, lock=True)
            for items in by_host.values():
                for item in items:
                    row = db_api.snapshot_item_get(session, snapshot_id, item['instance_id'])
                    row.frozen_at = frozen[item['name']].get('frozen_at')
                    row.state = states.ERROR
                    row.reason = clip(failed.get(item['name'], f'aborted: {who} did not freeze'))
            self.update_snapshot(session, snapshot_id)
            db_api.snapshot_get(session, snapshot_id).reason = clip(reason)
            return views.show_snapshot(session, snapshot_id)

    def _record(self, snapshot_id: str, by_host: dict[str, list[dict]],
                frozen: dict[str, dict], thawed: dict[str, dict]) -> dict:
        """Every item's barrier: uploading (or already done), or error with its reason."""
        deadline = models.utcnow() + datetime.timedelta(
            seconds=self.conf.snapshot_upload_timeout)
        with self.db.session() as session:
            # Uploads may already be reporting: their updates queue behind this lock.
            db_api.snapshot_get(session, snapshot_id, lock=True)
            for items in by_host.values():
                for item in items:
                    row = db_api.snapshot_item_get(session, snapshot_id, item['instance_id'])
                    result = thawed[item['name']]
                    row.frozen_at = frozen[item['name']]['frozen_at']
                    if 'error' in result:
                        # An upload that already reported (its host answered after the
                        # wait, or its own upload failed) says more than the missing answer.
                        if row.state == states.FREEZING:
                            row.state, row.reason = states.ERROR, clip(result['error'])
                        continue
                    row.pause_ms = result.get('pause_ms')
                    row.dirty_bytes = result.get('dirty_bytes', 0)
                    row.thawed_at = result['thawed_at']
                    row.deadline = deadline
                    if row.state == states.FREEZING:  # its upload may have finished already
                        row.state = states.UPLOADING
            self.update_snapshot(session, snapshot_id)
            return views.show_snapshot(session, snapshot_id)

    # -- after the cut -----------------------------------------------------------

    def item_done(self, snapshot_id: str, instance_id: str, version: str, uploaded_bytes: int,
                  error: str, persistent: bool = True) -> None:
        """An upload ended (``error`` empty: stored as ``version``, replicated, and
        ``persistent`` if its host wrote every new chunk to the repository). An item
        already given up (its deadline passed, its barrier failed) stays as it ended."""
        with self.db.session() as session:
            if db_api.snapshot_get(session, snapshot_id, lock=True) is None:
                return
            row = db_api.snapshot_item_get(session, snapshot_id, instance_id, lock=True)
            if row is None:
                return
            if row.state not in PENDING:
                LOG.warning('snapshot %s: the upload of instance %s ended (%s) after it was '
                            'given up as %s: %s', snapshot_id, instance_id,
                            error or f'stored as {version}', row.state, row.reason)
                return
            row.state = states.ERROR if error else states.AVAILABLE
            row.reason, row.version, row.uploaded_bytes = clip(error), version, uploaded_bytes
            row.replicated = not error
            if not error and persistent and self.warehouse is None:
                row.persistent = True
            self.update_snapshot(session, snapshot_id)
            if error:
                LOG.error('snapshot %s: instance %s not stored: %s', snapshot_id, instance_id,
                          error)
            else:
                LOG.info('snapshot %s: instance %s stored as %s, %d bytes new%s', snapshot_id,
                         instance_id, version, uploaded_bytes,
                         '' if persistent else ', on peers until persisted')
        if not error and persistent:
            # Its own chunks are in the repository; its parent's may not be yet.
            self._check_persistent([(snapshot_id, instance_id, version)])
        self.notify('snapshot.upload.end', {'snapshot': snapshot_id, 'instance': instance_id,
                                            'version': version, 'error': error})

    def items_persisted(self, snapshot_id: str, instance_ids: list[str]) -> None:
        """A host wrote the chunks of these items to the repository: each one is
        persistent once the repository holds all of its version."""
        with self.db.session() as session:
            items = [db_api.snapshot_item_get(session, snapshot_id, instance_id)
                     for instance_id in instance_ids]
            waiting = [(i.snapshot_id, i.instance_id, i.version) for i in items
                       if i is not None and i.replicated and not i.persistent]
        if self.warehouse is None:
            self._mark_persistent(waiting)
        else:
            self._check_persistent(waiting)

    def _check_persistent(self, items: list[tuple[str, str, str]]) -> None:
        """Mark persistent each (snapshot id, instance id, version) whose version the
        warehouse holds whole. One it cannot tell stays as it is, with a warning, and the
        next show asks again; a warehouse that cannot be reached is asked no more this
        time (a listing must not wait for its timeout once per item)."""
        if self.warehouse is None:
            return
        whole = []
        for snapshot_id, instance_id, version in items:
            try:
                image, number = manifest_mod.VersionRef.parse(version)
                with self._whole_lock:
                    known = set(self._whole)
                if number is not None and self.warehouse.is_whole(image, number, known):
                    whole.append((snapshot_id, instance_id, version))
                with self._whole_lock:
                    if len(self._whole) > WHOLE_KEPT:
                        self._whole.clear()
                    self._whole |= known
            except (exception.ImageNotFound, exception.CorruptManifest,
                    exception.InvalidName) as exc:
                LOG.warning('snapshot %s: instance %s (%s) cannot become persistent: %s',
                            snapshot_id, instance_id, version, exc)
            except exception.VmcloudError as exc:
                LOG.warning('snapshot %s: cannot tell whether instance %s (%s) is persistent: '
                            '%s', snapshot_id, instance_id, version, exc)
                break
        self._mark_persistent(whole)

    def _mark_persistent(self, items: list[tuple[str, str, str]]) -> None:
        if not items:
            return
        with self.db.session() as session:
            for snapshot_id, instance_id, version in items:
                row = db_api.snapshot_item_get(session, snapshot_id, instance_id, lock=True)
                if row is not None and row.replicated and not row.persistent:
                    row.persistent = True
                    LOG.info('snapshot %s: instance %s (%s) is persistent', snapshot_id,
                             instance_id, version)

    def _check_snapshots(self, snapshot_ids: list[str]) -> None:
        """Check every replicated item of these snapshots not yet persistent."""
        with self.db.session() as session:
            waiting = [(i.snapshot_id, i.instance_id, i.version)
                       for i in db_api.snapshot_items_of(session, snapshot_ids)
                       if i.replicated and not i.persistent]
        self._check_persistent(waiting)

    def expire(self, now: datetime.datetime) -> list[tuple[str, str]]:
        """End in error every item still freezing or uploading past its deadline.

        :returns: (snapshot id, instance id) of each item it ended.
        """
        reasons = {
            states.FREEZING: f'no barrier recorded within '
                             f'{dispatcher_rpcapi.snapshot_seconds(self.conf)} s',
            states.UPLOADING: f'upload did not finish within '
                              f'{self.conf.snapshot_upload_timeout} s'}
        ended = []
        with self.db.session() as session:
            by_snapshot = collections.defaultdict(list)
            for item in db_api.snapshot_items_past_deadline(session, now):
                by_snapshot[item.snapshot_id].append(item.instance_id)
            for snapshot_id, instance_ids in sorted(by_snapshot.items()):
                db_api.snapshot_get(session, snapshot_id, lock=True)
                for instance_id in instance_ids:
                    row = db_api.snapshot_item_get(session, snapshot_id, instance_id,
                                                   lock=True)
                    # Read again under the lock: its upload may have just reported.
                    if row.state not in PENDING or row.deadline is None or row.deadline >= now:
                        continue
                    reason = reasons[row.state]
                    LOG.error('snapshot %s: instance %s: %s', snapshot_id, instance_id, reason)
                    row.state, row.reason = states.ERROR, reason
                    ended.append((snapshot_id, instance_id, reason))
                self.update_snapshot(session, snapshot_id)
        for snapshot_id, instance_id, reason in ended:
            self.notify('snapshot.upload.end', {'snapshot': snapshot_id, 'instance': instance_id,
                                                'version': '', 'error': reason})
        return [(snapshot_id, instance_id) for snapshot_id, instance_id, _ in ended]

    def recover(self) -> list[str]:
        """End the barriers a previous dispatcher did not live to finish: their items still
        freezing end in error (the guests thawed themselves by pause_limit).

        :returns: the ids of the snapshots it ended.
        """
        ended = []
        with self.db.session() as session:
            for snapshot in db_api.snapshots(session):
                if snapshot.state not in PENDING:
                    continue
                db_api.snapshot_get(session, snapshot.id, lock=True)
                stuck = [item for item in db_api.snapshot_items(session, snapshot.id)
                         if item.state == states.FREEZING]
                if not stuck:
                    continue  # uploading: their reports or their deadlines end them
                for item in stuck:
                    item.state, item.reason = states.ERROR, RESTARTED
                self.update_snapshot(session, snapshot.id)
                LOG.warning('snapshot %s ended %s: %s', snapshot.id, snapshot.state, RESTARTED)
                ended.append(snapshot.id)
        return ended

    def _end_freezing(self, snapshot_id: str, reason: str) -> None:
        """End in error, with ``reason``, the snapshot's items still freezing."""
        with self.db.session() as session:
            db_api.snapshot_get(session, snapshot_id, lock=True)
            for item in db_api.snapshot_items(session, snapshot_id):
                if item.state == states.FREEZING:
                    item.state, item.reason = states.ERROR, clip(reason)
            self.update_snapshot(session, snapshot_id)

    @staticmethod
    def update_snapshot(session: db_api.Session, snapshot_id: str) -> None:
        """The snapshot's state from its items'; a partial or failed one's reason names
        each instance that failed and why."""
        counts = db_api.snapshot_item_state_counts(session, snapshot_id)
        outcome = transitions.snapshot(counts)
        snapshot = db_api.snapshot_get(session, snapshot_id)
        # transitions counts freezing as pending like uploading; the row tells the two apart.
        snapshot.state = states.FREEZING if counts.get(states.FREEZING) else outcome.state
        if outcome.state in (states.PARTIAL, states.ERROR):
            snapshot.reason = clip(f'{outcome.reason}: {_failures(session, snapshot)}')

    # -- reading -----------------------------------------------------------------

    def stored_versions(self, snapshot_id: str,
                        allow_partial: bool = False) -> tuple[list[str], str]:
        """The versions a snapshot stored (by instance name), and its deployment's id.

        :raises: SnapshotNotFound; InvalidRequest if it has not ended, it
            failed, or it is partial and ``allow_partial`` is not set (naming the
            instances it misses and why).
        """
        with self.db.session() as session:
            snapshot = views.snapshot(session, snapshot_id)
            if snapshot.state in PENDING:
                raise exception.InvalidRequest(
                    f'snapshot {snapshot_id} is still {snapshot.state}: wait until it ends')
            if snapshot.state == states.ERROR:
                raise exception.InvalidRequest(
                    f'snapshot {snapshot_id} failed and stored nothing: {snapshot.reason}')
            names = _names(session, snapshot)
            items = sorted(db_api.snapshot_items(session, snapshot_id),
                           key=lambda i: names[i.instance_id])
            if snapshot.state == states.PARTIAL and not allow_partial:
                stored = sum(1 for i in items if i.state == states.AVAILABLE)
                raise exception.InvalidRequest(
                    f'snapshot {snapshot_id} is partial, it misses '
                    f'{_failures(session, snapshot)}; allow partial snapshots '
                    f'(--allow-partial) to deploy its {stored} stored instances alone')
            return ([i.version for i in items if i.state == states.AVAILABLE and i.version],
                    snapshot.deployment_id)

    def show(self, snapshot_id: str) -> dict:
        """The snapshot as views.show_snapshot shows it, its items not yet persistent
        checked first.

        :raises: SnapshotNotFound.
        """
        self._check_snapshots([snapshot_id])
        with self.db.session() as session:
            return views.show_snapshot(session, snapshot_id)

    def list(self, deployment_id: str | None = None, limit: int | None = None,
             marker: str | None = None) -> list[dict]:
        """Every snapshot (of ``deployment_id`` if given; ``limit`` of them after the
        one of id ``marker``), newest first, each with ``replicated`` and ``persistent``
        (its items not yet persistent checked first).

        :raises: DeploymentNotFound if ``deployment_id`` names none; MarkerNotFound.
        """
        with self.db.session() as session:
            if deployment_id is not None:
                views.deployment(session, deployment_id)
            ids = [s.id for s in db_api.snapshots(session, deployment_id, limit, marker)]
        self._check_snapshots(ids)
        with self.db.session() as session:
            found = [db_api.snapshot_get(session, snapshot_id) for snapshot_id in ids]
            items = collections.defaultdict(list)
            for item in db_api.snapshot_items_of(session, ids):
                items[item.snapshot_id].append(item)
            # (One deleted between the two sessions is left out.)
            return [dict(views.row(s), **views.snapshot_replicas(s, items[s.id]))
                    for s in found if s is not None]


def _names(session: db_api.Session, snapshot: models.Snapshot) -> dict[str, str]:
    """{instance id: name} of the snapshot's deployment."""
    return {i.id: i.name for i in db_api.instances_of(session, snapshot.deployment_id)}


def _failures(session: db_api.Session, snapshot: models.Snapshot) -> str:
    """Each failed item of the snapshot: ``NAME: reason``, by name."""
    names = _names(session, snapshot)
    failed = sorted((names.get(i.instance_id, i.instance_id), i.reason)
                    for i in db_api.snapshot_items(session, snapshot.id)
                    if i.state == states.ERROR)
    return '; '.join(f'{name}: {reason}' for name, reason in failed)
