"""Snapshots of whole deployments: one barrier across hosts, then uploads per instance."""
import collections
import concurrent.futures
import logging
import uuid
from typing import Callable


from vmcloud import exception
from vmcloud import rpc
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.dispatcher import states
from vmcloud.dispatcher import transitions
from vmcloud.dispatcher import views

LOG = logging.getLogger(__name__)


class Snapshotter:
    def __init__(self, db: db_api.Database, compute: compute_rpcapi.ComputeAPI,
                 notify: Callable[[str, dict], None]):
        self.db = db
        self.compute = compute
        self.notify = notify

    def snapshot(self, deployment_id: str) -> dict:
        """Pause every active instance, take each dirty set at that barrier, resume, upload.

        :raises: DeploymentNotFound, InvalidRequest if none of its instances is active.
        """
        snapshot_id = str(uuid.uuid4())
        with self.db.session() as session:
            views.deployment(session, deployment_id)
            active = [i for i in db_api.instances_of(session, deployment_id)
                      if i.state == states.ACTIVE]
            if not active:
                raise exception.InvalidRequest(
                    f'deployment {deployment_id} has no active instance to snapshot')
            db_api.snapshot_create(session, id=snapshot_id, deployment_id=deployment_id,
                                   state=states.UPLOADING)
            by_host = collections.defaultdict(list)
            for instance in active:
                db_api.snapshot_item_create(session, snapshot_id=snapshot_id,
                                            instance_id=instance.id, state=states.FREEZING)
                by_host[instance.host].append({'instance_id': instance.id,
                                               'name': instance.name})
        outcome = self.barrier(snapshot_id, by_host)
        with self.db.session() as session:
            # Uploads may already be reporting: their updates queue behind this lock.
            db_api.snapshot_get(session, snapshot_id, lock=True)
            for items in by_host.values():
                for item in items:
                    row = db_api.snapshot_item_get(session, snapshot_id, item['instance_id'])
                    result = outcome.get(item['name'], {'error': 'no answer from its host'})
                    if 'error' in result:
                        row.state, row.reason = states.ERROR, result['error']
                        continue
                    row.pause_ms = result['pause_ms']
                    row.dirty_bytes = result['dirty_bytes']
                    if row.state == states.FREEZING:  # its upload may have finished already
                        row.state = states.UPLOADING
            self.update_snapshot(session, snapshot_id)
            return views.show_snapshot(session, snapshot_id)

    def barrier(self, snapshot_id: str, by_host: dict[str, list[dict]]) -> dict:
        """Freeze everywhere first, then barrier and thaw everywhere, hosts in parallel.

        :returns: {instance name: {'pause_ms', 'dirty_bytes'} or {'error'}}; an
            instance missing from it got no answer.
        """
        outcome: dict[str, dict] = {}
        freeze = rpc.with_current_request(self.compute.freeze)
        barrier_and_thaw = rpc.with_current_request(self.compute.barrier_and_thaw)
        with concurrent.futures.ThreadPoolExecutor(max(1, len(by_host))) as pool:
            frozen = {host: pool.submit(freeze, host, [i['name'] for i in items])
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
                    thaw[host] = pool.submit(barrier_and_thaw, host, snapshot_id, ready)
            for host, future in thaw.items():
                try:
                    outcome.update(future.result())
                except exception.VmcloudError as exc:
                    LOG.error('snapshot %s: barrier on %s failed: %s', snapshot_id, host, exc)
        return outcome

    def item_done(self, snapshot_id: str, instance_id: str, version: str, uploaded_bytes: int,
                  error: str) -> None:
        """An upload ended (``error`` empty: stored as ``version``)."""
        with self.db.session() as session:
            if db_api.snapshot_get(session, snapshot_id, lock=True) is None:
                return
            row = db_api.snapshot_item_get(session, snapshot_id, instance_id, lock=True)
            if row is None:
                return
            row.state = states.ERROR if error else states.AVAILABLE
            row.reason, row.version, row.uploaded_bytes = error, version, uploaded_bytes
            self.update_snapshot(session, snapshot_id)
        self.notify('snapshot.upload.end', {'snapshot': snapshot_id, 'instance': instance_id,
                                            'version': version, 'error': error})

    @staticmethod
    def update_snapshot(session: db_api.Session, snapshot_id: str) -> None:
        outcome = transitions.snapshot(db_api.snapshot_item_state_counts(session, snapshot_id))
        snapshot = db_api.snapshot_get(session, snapshot_id)
        snapshot.state = outcome.state
        if outcome.state != states.UPLOADING and outcome.state != states.AVAILABLE:
            snapshot.reason = outcome.reason

    def stored_versions(self, snapshot_id: str) -> tuple[list[str], str]:
        """The versions a snapshot stored, and its deployment's id.

        :raises: InvalidRequest if there is no such snapshot or it stored none.
        """
        with self.db.session() as session:
            snapshot = views.snapshot(session, snapshot_id)
            items = db_api.snapshot_items(session, snapshot_id, stored_only=True)
            if not items:
                raise exception.InvalidRequest(
                    f'snapshot {snapshot_id} has no stored versions (state {snapshot.state})')
            return [item.version for item in items], snapshot.deployment_id
