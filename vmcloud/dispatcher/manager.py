"""The dispatcher: takes requests, schedules them, and keeps the state of the cloud."""
import collections
import concurrent.futures
import datetime
import json
import logging
import threading
import uuid

import sqlalchemy
from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.dispatcher import states
from vmcloud.scheduler import handler
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

BUILDING, ACTIVE, ERROR, DELETED = (states.BUILDING, states.ACTIVE, states.ERROR,
                                    states.DELETED)
RUNNING_STATES = states.RUNNING_STATES
FREEZING, UPLOADING, AVAILABLE, PARTIAL = (states.FREEZING, states.UPLOADING,
                                           states.AVAILABLE, states.PARTIAL)


def _row(obj) -> dict:
    result = {}
    for column in obj.__table__.columns:
        value = getattr(obj, column.key)
        result[column.key] = value.isoformat() if isinstance(value, datetime.datetime) else value
    return result


class Dispatcher:
    def __init__(self, conf: cfg.ConfigOpts, warehouse: warehouse_mod.Warehouse | None = None):
        self.conf = conf
        self.warehouse = warehouse or warehouse_mod.Warehouse(conf)
        self.db = db_api.Database(conf)
        self.db.upgrade()
        self.scheduler = handler.FilterScheduler(conf)
        self.compute = compute_rpcapi.ComputeAPI(conf)
        self.notifier = rpc.notifier(conf, f'dispatcher.{conf.host}')
        # Scheduling reads free capacity and claims it: one request at a time.
        self._claims = threading.Lock()
        self._stopping = threading.Event()
        self._server = rpc.server(conf, dispatcher_rpcapi.TOPIC, conf.host, [self])
        self._monitor = threading.Thread(target=self._watch_hosts, daemon=True,
                                         name='host-monitor')

    def start(self) -> 'Dispatcher':
        self._server.start()
        self._monitor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.stop()
        self._server.wait()
        self.db.dispose()

    def _notify(self, event: str, payload: dict) -> None:
        try:
            self.notifier.info({}, event, payload)
        except Exception as exc:  # a notification must never fail the operation
            LOG.warning('notification %s not sent: %s', event, exc)

    # -- hosts -------------------------------------------------------------------

    @rpc.expose
    def report_heartbeat(self, ctxt: dict, host: str, capacity: dict) -> None:
        with self.db.session() as session:
            row = session.get(models.Host, host)
            if row is None:
                row = models.Host(name=host)
                session.add(row)
                LOG.info('compute host %s joined', host)
            elif not row.up:
                LOG.info('compute host %s is back', host)
            row.up = True
            row.vcpus = capacity['vcpus']
            row.memory_mib = capacity['memory_mib']
            row.disk_bytes_free = capacity['disk_bytes_free']
            row.last_heartbeat = models.utcnow()

    @rpc.expose
    def list_hosts(self, ctxt: dict) -> list[dict]:
        with self.db.session() as session:
            usage = {s.name: s for s in self._host_states(session)}
            return [dict(_row(h), instances=usage[h.name].instance_count,
                         vcpus_used=usage[h.name].vcpus_used,
                         memory_mib_used=usage[h.name].memory_mib_used)
                    for h in session.scalars(sqlalchemy.select(models.Host)
                                             .order_by(models.Host.name))]

    def _host_states(self, session) -> list[HostState]:
        used = collections.defaultdict(lambda: [0, 0, 0])
        running = session.execute(
            sqlalchemy.select(models.Instance.host, models.Deployment.vcpus,
                              models.Deployment.memory_mib)
            .join(models.Deployment, models.Instance.deployment_id == models.Deployment.id)
            .where(models.Instance.state.in_(RUNNING_STATES), models.Instance.host.is_not(None)))
        for host, vcpus, memory_mib in running:
            totals = used[host]
            totals[0] += vcpus
            totals[1] += memory_mib
            totals[2] += 1
        return [HostState(name=h.name, up=h.up, vcpus_total=h.vcpus,
                          vcpus_used=used[h.name][0], memory_mib_total=h.memory_mib,
                          memory_mib_used=used[h.name][1], disk_bytes_free=h.disk_bytes_free,
                          instance_count=used[h.name][2])
                for h in session.scalars(sqlalchemy.select(models.Host)
                                         .order_by(models.Host.name))]

    def _watch_hosts(self) -> None:
        while not self._stopping.wait(self.conf.heartbeat_interval):
            try:
                self._mark_dead_hosts()
            except exception.VmcloudError as exc:
                LOG.error('cannot check compute hosts: %s', exc)

    def _mark_dead_hosts(self) -> None:
        deadline = models.utcnow() - datetime.timedelta(seconds=self.conf.service_down_time)
        failed_builds = []
        with self.db.session() as session:
            dead = session.scalars(sqlalchemy.select(models.Host).where(
                models.Host.up.is_(True), models.Host.last_heartbeat < deadline)).all()
            for host in dead:
                LOG.warning('compute host %s sent no heartbeat since %s: marked down',
                            host.name, host.last_heartbeat)
                host.up = False
                for instance in session.scalars(sqlalchemy.select(models.Instance).where(
                        models.Instance.host == host.name,
                        models.Instance.state.in_(RUNNING_STATES))):
                    if instance.state == BUILDING:
                        failed_builds.append((instance.id, host.name))
                    else:
                        instance.state = ERROR
                        instance.reason = f'compute host {host.name} stopped sending heartbeats'
                        self._update_deployment(session, instance.deployment_id)
        for instance_id, host in failed_builds:
            self.build_failed({}, instance_id, host, f'compute host {host} went down')

    # -- deploying ---------------------------------------------------------------

    @rpc.expose
    def deploy(self, ctxt: dict, image: str, count: int, min_count: int | None, vcpus: int,
               memory_mib: int, boot: dict) -> dict:
        if count < 1 or vcpus < 1 or memory_mib < 1:
            raise exception.InvalidRequest(
                f'count, vcpus and memory must be at least 1 (got {count}, {vcpus}, '
                f'{memory_mib})')
        min_count = count if min_count is None else min_count
        if not 1 <= min_count <= count:
            raise exception.InvalidRequest(f'min count {min_count} must be between 1 and {count}')
        ref = str(self.warehouse.lookup(image).ref)
        return self._deploy([ref] * count, min_count, vcpus, memory_mib, boot)

    @rpc.expose
    def deploy_snapshot(self, ctxt: dict, snapshot_id: str, boot: dict) -> dict:
        with self.db.session() as session:
            snapshot = self._snapshot(session, snapshot_id)
            items = session.scalars(sqlalchemy.select(models.SnapshotItem).where(
                models.SnapshotItem.snapshot_id == snapshot_id,
                models.SnapshotItem.version != '')).all()
            if not items:
                raise exception.InvalidRequest(
                    f'snapshot {snapshot_id} has no stored versions (state {snapshot.state})')
            deployment = session.get(models.Deployment, snapshot.deployment_id)
            refs = [item.version for item in items]
            vcpus, memory_mib = deployment.vcpus, deployment.memory_mib
            boot = boot or json.loads(deployment.boot)
        return self._deploy(refs, len(refs), vcpus, memory_mib, boot)

    def _deploy(self, refs: list[str], min_count: int, vcpus: int, memory_mib: int,
                boot: dict) -> dict:
        deployment_id = str(uuid.uuid4())
        request = InstanceRequest(vcpus=vcpus, memory_mib=memory_mib)
        with self._claims:
            with self.db.session() as session:
                hosts = self._host_states(session)
                placed = self.scheduler.select_hosts(hosts, request, len(refs), min_count)
                session.add(models.Deployment(
                    id=deployment_id, image=refs[0], count=len(refs), min_count=min_count,
                    vcpus=vcpus, memory_mib=memory_mib, boot=json.dumps(boot), state=BUILDING))
                session.flush()
                builds = []
                for index, (ref, host) in enumerate(zip(refs, placed)):
                    instance = models.Instance(
                        id=str(uuid.uuid4()), name=f'vm-{deployment_id[:8]}-{index}',
                        deployment_id=deployment_id, image=ref, host=host, state=BUILDING,
                        attempts=1)
                    session.add(instance)
                    builds.append(self._build_request(instance, vcpus, memory_mib, boot))
        LOG.info('deployment %s: %d instances of %s on %s', deployment_id, len(builds),
                 refs[0], dict(collections.Counter(placed)))
        for build in builds:
            self._cast_build(build)
        self._notify('deployment.create.start', {'id': deployment_id, 'count': len(builds)})
        return self.show_deployment({}, deployment_id)

    @staticmethod
    def _build_request(instance: models.Instance, vcpus: int, memory_mib: int,
                       boot: dict) -> dict:
        return {'id': instance.id, 'name': instance.name, 'image': instance.image,
                'host': instance.host, 'vcpus': vcpus, 'memory_mib': memory_mib, 'boot': boot}

    def _cast_build(self, build: dict) -> None:
        try:
            self.compute.build_instance(build['host'], build)
        except exception.VmcloudError as exc:
            self.build_failed({}, build['id'], build['host'], f'cannot reach the host: {exc}')

    @rpc.expose
    def instance_built(self, ctxt: dict, instance_id: str, host: str, boot_seconds: float,
                       fetched_bytes: int) -> None:
        with self.db.session() as session:
            instance = self._lock_instance(session, instance_id)
            if instance is None or instance.host != host or instance.state != BUILDING:
                # Built too late (on a host given up on, or a deleted deployment): undo it.
                LOG.warning('instance %s built on %s, no longer wanted there', instance_id, host)
                self.compute.destroy_instance(host, instance.name if instance else instance_id)
                return
            instance.state = ACTIVE
            instance.boot_seconds = boot_seconds
            instance.fetched_bytes = fetched_bytes
            self._update_deployment(session, instance.deployment_id)
        self._notify('instance.create.end', {'id': instance_id, 'host': host})

    @rpc.expose
    def build_failed(self, ctxt: dict, instance_id: str, host: str, reason: str) -> None:
        """Retry on another host, up to [scheduler] max_attempts; then ERROR with the reason."""
        retry = None
        with self._claims, self.db.session() as session:
            instance = self._lock_instance(session, instance_id)
            if instance is None or instance.state != BUILDING or instance.host != host:
                return
            failed = [h for h in instance.failed_hosts.split(',') if h] + [host]
            instance.failed_hosts = ','.join(failed)
            deployment = session.get(models.Deployment, instance.deployment_id)
            request = InstanceRequest(vcpus=deployment.vcpus, memory_mib=deployment.memory_mib)
            candidates = [h for h in self._host_states(session) if h.name not in failed]
            if instance.attempts >= self.conf.scheduler.max_attempts:
                why = f'failed {instance.attempts} times; last on {host}: {reason}'
            else:
                try:
                    instance.host = self.scheduler.select_hosts(candidates, request, 1)[0]
                    instance.attempts += 1
                    retry = self._build_request(instance, deployment.vcpus,
                                                deployment.memory_mib,
                                                json.loads(deployment.boot))
                    LOG.info('instance %s failed on %s (%s); retrying on %s', instance.name,
                             host, reason, instance.host)
                except exception.NoValidHost:
                    why = f'failed on {host}: {reason}; no other host can take it'
            if retry is None:
                instance.state = ERROR
                instance.reason = why
                instance.host = None
                self._update_deployment(session, instance.deployment_id)
        if retry is not None:
            self._cast_build(retry)
        else:
            self._notify('instance.create.error', {'id': instance_id, 'reason': reason})

    @staticmethod
    def _lock_instance(session, instance_id: str) -> models.Instance | None:
        """The instance, with its deployment locked first: the deployment's state is
        computed from all its instances, so their updates must not interleave."""
        instance = session.get(models.Instance, instance_id)
        if instance is not None:
            session.get(models.Deployment, instance.deployment_id, with_for_update=True)
            session.refresh(instance, with_for_update=True)
        return instance

    def _update_deployment(self, session, deployment_id: str) -> None:
        session.flush()
        deployment = session.get(models.Deployment, deployment_id)
        if deployment.state == DELETED:
            return
        counts = collections.Counter(session.scalars(sqlalchemy.select(
            models.Instance.state).where(models.Instance.deployment_id == deployment_id)))
        if counts[BUILDING]:
            deployment.state = BUILDING
        elif counts[ACTIVE] >= deployment.min_count:
            deployment.state = ACTIVE
            deployment.reason = '' if not counts[ERROR] else f'{counts[ERROR]} instances failed'
        else:
            deployment.state = ERROR
            deployment.reason = (f'only {counts[ACTIVE]} of {deployment.count} instances '
                                 f'became active, {deployment.min_count} needed')

    # -- reading -----------------------------------------------------------------

    def _deployment(self, session, deployment_id: str) -> models.Deployment:
        deployment = session.get(models.Deployment, deployment_id)
        if deployment is None:
            raise exception.DeploymentNotFound(deployment_id)
        return deployment

    def _instances(self, session, deployment_id: str) -> list[models.Instance]:
        return list(session.scalars(sqlalchemy.select(models.Instance).where(
            models.Instance.deployment_id == deployment_id).order_by(models.Instance.name)))

    @rpc.expose
    def show_deployment(self, ctxt: dict, deployment_id: str) -> dict:
        with self.db.session() as session:
            deployment = self._deployment(session, deployment_id)
            result = _row(deployment)
            result['boot'] = json.loads(deployment.boot)
            result['instances'] = [_row(i) for i in self._instances(session, deployment_id)]
            return result

    @rpc.expose
    def list_deployments(self, ctxt: dict) -> list[dict]:
        with self.db.session() as session:
            return [_row(d) for d in session.scalars(sqlalchemy.select(models.Deployment)
                                                     .order_by(models.Deployment.created_at))]

    @rpc.expose
    def delete_deployment(self, ctxt: dict, deployment_id: str) -> dict:
        with self.db.session() as session:
            deployment = self._deployment(session, deployment_id)
            doomed = []
            for instance in self._instances(session, deployment_id):
                if instance.host is not None and instance.state in RUNNING_STATES:
                    doomed.append((instance.host, instance.name))
                instance.state = DELETED
            deployment.state = DELETED
        for host, name in doomed:
            try:
                self.compute.destroy_instance(host, name)
            except exception.VmcloudError as exc:
                LOG.error('cannot tell %s to destroy %s: %s', host, name, exc)
        self._notify('deployment.delete.end', {'id': deployment_id})
        return self.show_deployment({}, deployment_id)

    # -- snapshots ---------------------------------------------------------------

    def _snapshot(self, session, snapshot_id: str) -> models.Snapshot:
        snapshot = session.get(models.Snapshot, snapshot_id)
        if snapshot is None:
            raise exception.InvalidRequest(f'snapshot {snapshot_id} not found')
        return snapshot

    @rpc.expose
    def snapshot(self, ctxt: dict, deployment_id: str) -> dict:
        """Pause every active instance, take each dirty set at that barrier, resume, upload."""
        snapshot_id = str(uuid.uuid4())
        with self.db.session() as session:
            self._deployment(session, deployment_id)
            active = [i for i in self._instances(session, deployment_id) if i.state == ACTIVE]
            if not active:
                raise exception.InvalidRequest(
                    f'deployment {deployment_id} has no active instance to snapshot')
            session.add(models.Snapshot(id=snapshot_id, deployment_id=deployment_id,
                                        state=UPLOADING))
            session.flush()
            by_host = collections.defaultdict(list)
            for instance in active:
                session.add(models.SnapshotItem(snapshot_id=snapshot_id,
                                                instance_id=instance.id, state=FREEZING))
                by_host[instance.host].append({'instance_id': instance.id,
                                               'name': instance.name})
        outcome = self._barrier(snapshot_id, by_host)
        with self.db.session() as session:
            # Uploads may already be reporting: their updates queue behind this lock.
            session.get(models.Snapshot, snapshot_id, with_for_update=True)
            for items in by_host.values():
                for item in items:
                    row = session.get(models.SnapshotItem, (snapshot_id, item['instance_id']))
                    result = outcome.get(item['name'], {'error': 'no answer from its host'})
                    if 'error' in result:
                        row.state, row.reason = ERROR, result['error']
                        continue
                    row.pause_ms = result['pause_ms']
                    row.dirty_bytes = result['dirty_bytes']
                    if row.state == FREEZING:  # its upload may have finished already
                        row.state = UPLOADING
            self._update_snapshot(session, snapshot_id)
        return self.show_snapshot({}, snapshot_id)

    def _barrier(self, snapshot_id: str, by_host: dict[str, list[dict]]) -> dict:
        """Freeze everywhere first, then barrier and thaw everywhere, hosts in parallel."""
        outcome: dict[str, dict] = {}
        with concurrent.futures.ThreadPoolExecutor(max(1, len(by_host))) as pool:
            frozen = {host: pool.submit(self.compute.freeze, host, [i['name'] for i in items])
                      for host, items in by_host.items()}
            thaw = {}
            for host, future in frozen.items():
                try:
                    errors = future.result()
                except exception.VmcloudError as exc:
                    errors = {i['name']: f'cannot freeze on {host}: {exc}' for i in by_host[host]}
                ready = []
                for item in by_host[host]:
                    if errors.get(item['name']):
                        outcome[item['name']] = {'error': errors[item['name']]}
                    else:
                        ready.append(item)
                if ready:
                    thaw[host] = pool.submit(self.compute.barrier_and_thaw, host, snapshot_id,
                                             ready)
            for host, future in thaw.items():
                try:
                    outcome.update(future.result())
                except exception.VmcloudError as exc:
                    LOG.error('snapshot %s: barrier on %s failed: %s', snapshot_id, host, exc)
        return outcome

    @rpc.expose
    def snapshot_item_done(self, ctxt: dict, snapshot_id: str, instance_id: str, version: str,
                           uploaded_bytes: int, error: str) -> None:
        with self.db.session() as session:
            if session.get(models.Snapshot, snapshot_id, with_for_update=True) is None:
                return
            row = session.get(models.SnapshotItem, (snapshot_id, instance_id),
                              with_for_update=True)
            if row is None:
                return
            row.state = ERROR if error else AVAILABLE
            row.reason, row.version, row.uploaded_bytes = error, version, uploaded_bytes
            self._update_snapshot(session, snapshot_id)
        self._notify('snapshot.upload.end', {'snapshot': snapshot_id, 'instance': instance_id,
                                             'version': version, 'error': error})

    def _update_snapshot(self, session, snapshot_id: str) -> None:
        session.flush()
        counts = collections.Counter(session.scalars(sqlalchemy.select(
            models.SnapshotItem.state).where(models.SnapshotItem.snapshot_id == snapshot_id)))
        snapshot = session.get(models.Snapshot, snapshot_id)
        if counts[FREEZING] or counts[UPLOADING]:
            snapshot.state = UPLOADING
        elif counts[ERROR]:
            snapshot.state = ERROR if not counts[AVAILABLE] else PARTIAL
            snapshot.reason = f'{counts[ERROR]} instances could not be snapshotted'
        else:
            snapshot.state = AVAILABLE

    @rpc.expose
    def show_snapshot(self, ctxt: dict, snapshot_id: str) -> dict:
        with self.db.session() as session:
            result = _row(self._snapshot(session, snapshot_id))
            result['items'] = [_row(i) for i in session.scalars(
                sqlalchemy.select(models.SnapshotItem).where(
                    models.SnapshotItem.snapshot_id == snapshot_id))]
            return result
