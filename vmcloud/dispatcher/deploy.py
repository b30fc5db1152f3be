"""Deployments: claiming hosts for all instances at once, building, retrying, deleting."""
import collections
import json
import logging
import threading
import uuid
from typing import Callable

from oslo_config import cfg

from vmcloud import exception
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import hosts as hosts_mod
from vmcloud.dispatcher import states
from vmcloud.dispatcher import transitions
from vmcloud.dispatcher import views
from vmcloud.scheduler import handler
from vmcloud.scheduler.host_state import InstanceRequest

LOG = logging.getLogger(__name__)

Notify = Callable[[str, dict], None]


class Deployer:
    """Places, builds and tracks the instances of deployments."""

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database,
                 scheduler: handler.FilterScheduler, compute: compute_rpcapi.ComputeAPI,
                 notify: Notify):
        self.conf = conf
        self.db = db
        self.scheduler = scheduler
        self.compute = compute
        self.notify = notify
        # Scheduling reads free capacity and claims it: one request at a time.
        self._claims = threading.Lock()

    def deploy(self, refs: list[str], min_count: int, vcpus: int, memory_mib: int,
               boot: dict) -> dict:
        """One instance per image reference, placed all at once; builds cast after commit.

        :raises: NoValidHost (nothing written), DatabaseError.
        """
        deployment_id = str(uuid.uuid4())
        request = InstanceRequest(vcpus=vcpus, memory_mib=memory_mib)
        with self._claims:
            with self.db.session() as session:
                placed = self.scheduler.select_hosts(hosts_mod.host_states(session),
                                                     request, len(refs), min_count)
                db_api.deployment_create(
                    session, id=deployment_id, image=refs[0], count=len(refs),
                    min_count=min_count, vcpus=vcpus, memory_mib=memory_mib,
                    boot=json.dumps(boot), state=states.BUILDING)
                builds = []
                for index, (ref, host) in enumerate(zip(refs, placed)):
                    instance = db_api.instance_create(
                        session, id=str(uuid.uuid4()), name=f'vm-{deployment_id[:8]}-{index}',
                        deployment_id=deployment_id, image=ref, host=host,
                        state=states.BUILDING, attempts=1)
                    builds.append(_build_request(instance, vcpus, memory_mib, boot))
        LOG.info('deployment %s: %d instances of %s on %s', deployment_id, len(builds),
                 refs[0], dict(collections.Counter(placed)))
        for build in builds:
            self._cast_build(build)
        self.notify('deployment.create.start', {'id': deployment_id, 'count': len(builds)})
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)

    def _cast_build(self, build: dict) -> None:
        try:
            self.compute.build_instance(build['host'], build)
        except exception.VmcloudError as exc:
            self.build_failed(build['id'], build['host'], f'cannot reach the host: {exc}')

    def instance_built(self, instance_id: str, host: str, boot_seconds: float,
                       fetched_bytes: int) -> None:
        """An instance is up on ``host``; one no longer wanted there is destroyed.

        :raises: DatabaseError; MessagingError if the unwanted one cannot be destroyed.
        """
        with self.db.session() as session:
            instance = db_api.instance_lock(session, instance_id)
            if instance is None or instance.host != host or instance.state != states.BUILDING:
                unwanted = instance.name if instance else instance_id
            else:
                unwanted = None
                LOG.info('instance %s active on %s', instance.name, host)
                instance.state = states.ACTIVE
                instance.boot_seconds = boot_seconds
                instance.fetched_bytes = fetched_bytes
                self.update_deployment(session, instance.deployment_id)
        if unwanted is not None:
            # Built too late (on a host given up on, or a deleted deployment): undo it,
            # with no row locked while the message goes.
            LOG.warning('instance %s built on %s, no longer wanted there', instance_id, host)
            self.compute.destroy_instance(host, unwanted)
            return
        self.notify('instance.create.end', {'id': instance_id, 'host': host})

    def build_failed(self, instance_id: str, host: str, reason: str) -> None:
        """Retry on another host, up to [scheduler] max_attempts; then ERROR with the reason.

        :raises: DatabaseError.
        """
        retry = None
        with self._claims, self.db.session() as session:
            instance = db_api.instance_lock(session, instance_id)
            if instance is None or instance.state != states.BUILDING or instance.host != host:
                return
            failed = transitions.failed_hosts(instance.failed_hosts, host)
            instance.failed_hosts = ','.join(failed)
            deployment = db_api.deployment_get(session, instance.deployment_id)
            request = InstanceRequest(vcpus=deployment.vcpus, memory_mib=deployment.memory_mib)
            why = transitions.out_of_attempts(instance.attempts,
                                              self.conf.scheduler.max_attempts, host, reason)
            if why is None:
                candidates = [h for h in hosts_mod.host_states(session)
                              if h.name not in failed]
                try:
                    instance.host = self.scheduler.select_hosts(candidates, request, 1)[0]
                except exception.NoValidHost:
                    why = transitions.no_other_host(host, reason)
                else:
                    instance.attempts += 1
                    retry = _build_request(instance, deployment.vcpus, deployment.memory_mib,
                                           json.loads(deployment.boot))
                    LOG.info('instance %s failed on %s (%s); retrying on %s', instance.name,
                             host, reason, instance.host)
            if retry is None:
                instance.state = states.ERROR
                instance.reason = why
                instance.host = None
                self.update_deployment(session, instance.deployment_id)
        if retry is not None:
            self._cast_build(retry)
        else:
            self.notify('instance.create.error', {'id': instance_id, 'reason': reason})

    def host_lost(self, session: db_api.Session, host: str) -> list[str]:
        """Settle the instances of a host marked down (see transitions.on_lost_host).

        :returns: the ids of its building instances, for build_failed after commit.
        """
        rebuild = []
        for instance in db_api.instances_on(session, host, states.RUNNING_STATES):
            outcome = transitions.on_lost_host(instance.state, host)
            if outcome is None:
                rebuild.append(instance.id)
                continue
            instance.state, instance.reason = outcome.state, outcome.reason
            self.update_deployment(session, instance.deployment_id)
        return rebuild

    @staticmethod
    def update_deployment(session: db_api.Session, deployment_id: str) -> None:
        """Derive the deployment's state from its instances' (a deleted one stays so)."""
        deployment = db_api.deployment_get(session, deployment_id)
        if deployment.state == states.DELETED:
            return
        outcome = transitions.deployment(db_api.instance_state_counts(session, deployment_id),
                                         deployment.count, deployment.min_count)
        deployment.state = outcome.state
        if outcome.state != states.BUILDING:
            deployment.reason = outcome.reason

    def delete(self, deployment_id: str) -> dict:
        """Mark it deleted and destroy its instances. :raises: DeploymentNotFound."""
        with self.db.session() as session:
            deployment = views.deployment(session, deployment_id)
            doomed = []
            for instance in db_api.instances_of(session, deployment_id):
                if instance.host is not None and instance.state in states.RUNNING_STATES:
                    doomed.append((instance.host, instance.name))
                instance.state = states.DELETED
            deployment.state = states.DELETED
        for host, name in doomed:
            try:
                self.compute.destroy_instance(host, name)
            except exception.VmcloudError as exc:
                LOG.error('cannot tell %s to destroy %s: %s', host, name, exc)
        self.notify('deployment.delete.end', {'id': deployment_id})
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)


def _build_request(instance: models.Instance, vcpus: int, memory_mib: int,
                   boot: dict) -> dict:
    return {'id': instance.id, 'name': instance.name, 'image': instance.image,
            'host': instance.host, 'vcpus': vcpus, 'memory_mib': memory_mib, 'boot': boot}
