"""Deployments: claiming hosts for all instances at once, building, retrying, deleting,
and what becomes of instances as their hosts go silent, report, or are fenced."""
import collections
import datetime
import json
import logging
import threading
import uuid
from typing import Callable
from typing import NamedTuple

from oslo_config import cfg

from vmcloud import exception
from vmcloud.compute import artifacts
from vmcloud.compute import readiness
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import clouds
from vmcloud.dispatcher import hosts as hosts_mod
from vmcloud.dispatcher import networks
from vmcloud.dispatcher import states
from vmcloud.dispatcher import transitions
from vmcloud.dispatcher import views
from vmcloud.scheduler import handler
from vmcloud.scheduler.host_state import InstanceRequest

LOG = logging.getLogger(__name__)

Notify = Callable[[str, dict], None]


def health_check(health: dict | None, build_timeout: int) -> dict:
    """A deployment's readiness check, checked as its compute hosts check it
    (``readiness.check``: what they would refuse is refused here, not a deployment whose
    every build fails), its timeout at most ``build_timeout`` (the dispatcher ends a
    build then, whatever the host still waits for).

    :raises: InvalidRequest naming what is wrong.
    """
    health = readiness.check(health)
    timeout = health.get('timeout')
    if timeout is not None and not timeout <= build_timeout:
        raise exception.InvalidRequest(
            f'health check timeout {timeout:g} s is above the dispatcher\'s '
            f'build_timeout ({build_timeout} s), which ends every build')
    return health


def check_artifacts(fields: dict, lookup: Callable[[str], object],
                    build_timeout: int) -> dict:
    """``fields`` of an application (or the changes to one) with what deploy would refuse
    of its artifacts refused now: 'image' must be in the warehouse, the images 'boot'
    names too (each deploy pins their versions of then), 'health' is checked by
    health_check. Those of them missing from ``fields`` are not looked at.

    :param lookup: ``Warehouse.lookup``.
    :returns: ``fields``, 'boot' as stored ({} for None), 'health' as health_check
        makes it (None for none: the marker).
    :raises: ImageNotFound, InvalidRequest naming what is wrong.
    """
    if not isinstance(fields, dict):
        raise exception.InvalidRequest(f'an application\'s fields are a mapping, not '
                                       f'{fields!r}')
    checked = dict(fields)
    if 'image' in checked:
        lookup(checked['image'])
    if 'boot' in checked:
        checked['boot'] = checked['boot'] or {}
        if not isinstance(checked['boot'], dict):
            raise exception.InvalidRequest(f'boot must be a mapping, not '
                                           f'{checked["boot"]!r}')
        artifacts.pinned(checked['boot'], lookup)
    if 'health' in checked:
        checked['health'] = (health_check(checked['health'], build_timeout)
                             if checked['health'] else None)
    return checked


class Deployer:
    """Places, builds and tracks the instances of deployments (the hosts' InstanceKeeper)."""

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database,
                 scheduler: handler.FilterScheduler, compute: compute_rpcapi.ComputeAPI,
                 notify: Notify, gateway: clouds.Gateway | None = None):
        """``gateway``: told to refresh when what it serves changes (None: no gateway
        to tell)."""
        self.conf = conf
        self.db = db
        self.scheduler = scheduler
        self.compute = compute
        self.notify = notify
        self.gateway = gateway
        # Scheduling reads free capacity and claims it: one request at a time.
        self._claims = threading.Lock()

    def deploy(self, refs: list[str], min_count: int, vcpus: int, memory_mib: int,
               boot: dict, health: dict | None = None, cloud: str = clouds.DEFAULT,
               application: str | None = None, port: int | None = None,
               protocol: str | None = None, owner: str | None = None) -> dict:
        """One instance per image reference, placed all at once on hosts of ``cloud``,
        with the deployment's network, the instances' ports and (with a service:
        ``port`` and ``protocol``) a listener port allocated in the same unit of work;
        builds cast after commit. ``health``: see health_check. ``owner``: the API
        user it is deployed for (None: none).

        :raises: InvalidRequest (a bad health check or service), CloudNotFound,
            NoValidHost, AddressPoolExhausted naming the pool, ListenerPortsExhausted
            naming the range (nothing written for any), DatabaseError.
        """
        health = health_check(health, self.conf.build_timeout)
        clouds.check_service(port, protocol)
        spec = Spec(refs, min_count, vcpus, memory_mib, boot, health, cloud, application,
                    port, protocol, owner)
        with self._claims:
            try:
                deployment_id, placed, builds = self._place(spec)
            except db_api.Conflict as exc:
                # Another dispatcher took the subnet, VNI or listener port picked (see
                # networks): this one wrote nothing; once more, it reads what the other
                # committed.
                LOG.warning('deployment of %s refused by the database (%s); trying again',
                            refs[0], exc)
                deployment_id, placed, builds = self._place(spec)
        LOG.info('deployment %s: %d instances of %s on %s', deployment_id, len(builds),
                 refs[0], dict(collections.Counter(placed)))
        for build in builds:
            self._cast_build(build)
        self.notify('deployment.create.start', {'id': deployment_id, 'count': len(builds)})
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)

    def _place(self, spec: 'Spec') -> tuple[str, list[str], list[dict]]:
        """One unit of work of deploy, under self._claims.

        :returns: (deployment id, hosts placed on, build requests).
        :raises: CloudNotFound, NoValidHost, AddressPoolExhausted, ListenerPortsExhausted,
            Conflict, DatabaseError.
        """
        deployment_id = str(uuid.uuid4())
        refs = spec.refs
        with self.db.session() as session:
            request = self._request(session, spec.vcpus, spec.memory_mib, spec.cloud)
            placed = self.scheduler.select_hosts(hosts_mod.host_states(session),
                                                 request, len(refs), spec.min_count)
            listener_port = (clouds.allocate_listener_port(self.conf, session, spec.protocol)
                             if spec.protocol is not None else None)
            deployment = db_api.deployment_create(
                session, id=deployment_id, image=refs[0], count=len(refs),
                min_count=spec.min_count, vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                boot=json.dumps(spec.boot), health=json.dumps(spec.health),
                state=states.BUILDING, cloud=spec.cloud, application=spec.application,
                port=spec.port, protocol=spec.protocol, listener_port=listener_port,
                owner=spec.owner)
            instances = [db_api.instance_create(
                session, id=str(uuid.uuid4()), name=f'vm-{deployment_id[:8]}-{index}',
                deployment_id=deployment_id, image=ref, host=host, state=states.BUILDING,
                attempts=1) for index, (ref, host) in enumerate(zip(refs, placed))]
            networks.allocate(self.conf, session, deployment_id, instances)
            builds = [self._build_request(session, instance, deployment)
                      for instance in instances]
            if listener_port is not None:
                clouds.refresh_after_commit(session, self.gateway)
        return deployment_id, placed, builds

    @staticmethod
    def _request(session: db_api.Session, vcpus: int, memory_mib: int,
                 cloud: str) -> InstanceRequest:
        """What one instance of a deployment of ``cloud`` asks the scheduler for: its
        size, and the cloud's hosts (None: any).

        :raises: CloudNotFound.
        """
        hosts = clouds.placement_hosts(session, cloud)
        return InstanceRequest(vcpus=vcpus, memory_mib=memory_mib,
                               cloud_hosts=tuple(hosts) if hosts is not None else None)

    def _build_request(self, session: db_api.Session, instance: models.Instance,
                       deployment: models.Deployment) -> dict:
        """The build_instance request of the instance's current attempt, its deadline set:
        every build cast has one, so no instance stays building for ever.

        :raises: AddressPoolExhausted if its host has no DHCP port in the network yet
            and none is left.
        """
        network = networks.build_keys(session, instance)
        instance.deadline = models.utcnow() + datetime.timedelta(
            seconds=self.conf.build_timeout)
        return {'id': instance.id, 'name': instance.name, 'image': instance.image,
                'host': instance.host, 'vcpus': deployment.vcpus,
                'memory_mib': deployment.memory_mib, 'boot': json.loads(deployment.boot),
                'attempt': instance.attempts,
                'health': json.loads(deployment.health) or {'kind': 'marker'}, **network}

    def _cast_build(self, build: dict) -> None:
        try:
            self.compute.build_instance(build['host'], build)
        except exception.VmcloudError as exc:
            self.build_failed(build['id'], build['host'], f'cannot reach the host: {exc}')

    def build_wanted(self, instance_id: str, host: str, attempt: int) -> bool:
        """Whether a build request is current: not moved, deleted or retried since.

        :raises: DatabaseError.
        """
        with self.db.session() as session:
            instance = db_api.instance_get(session, instance_id)
            wanted = (instance is not None and instance.state == states.BUILDING
                      and instance.host == host and instance.attempts == attempt)
        if not wanted:
            LOG.info('build of %s on %s, attempt %d, is stale', instance_id, host, attempt)
        return wanted

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
                instance.deadline = None
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

    def build_failed(self, instance_id: str, host: str, reason: str,
                     cleaned: bool = True) -> None:
        """Retry on another host, up to [scheduler] max_attempts; then ERROR with the reason.

        ``cleaned``: the host reported the failure, so it holds nothing of the guest;
        otherwise (no answer) an instance given up on keeps the host, whose capacity it
        may still use and which a delete must tell to destroy it.

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
            why = transitions.out_of_attempts(instance.attempts,
                                              self.conf.scheduler.max_attempts, host, reason)
            if why is None:
                retry, why = self._place_again(session, instance, deployment, failed, host,
                                               reason)
            if retry is None:
                instance.state = states.ERROR
                instance.reason = why
                instance.deadline = None
                if cleaned:
                    instance.host = None
                self.update_deployment(session, instance.deployment_id)
        if retry is not None:
            self._cast_rebuild(retry)
        else:
            self.notify('instance.create.error', {'id': instance_id, 'reason': reason})

    def _place_again(self, session: db_api.Session, instance: models.Instance,
                     deployment: models.Deployment, excluded: list[str], host: str,
                     reason: str) -> tuple['Rebuild | None', str]:
        """Move ``instance`` to another host, a new attempt, building, with its port (its
        address and MAC go with it) and a DHCP port of the new host.

        :returns: (its build request and the peer sets the move changed, '') or (None,
            why no host can take it, or no DHCP port is left for it).
        """
        try:
            request = self._request(session, deployment.vcpus, deployment.memory_mib,
                                    deployment.cloud)
        except exception.CloudNotFound:  # deleted while it ran: no cloud's hosts to limit
            request = InstanceRequest(vcpus=deployment.vcpus, memory_mib=deployment.memory_mib)
        candidates = [h for h in hosts_mod.host_states(session) if h.name not in excluded]
        try:
            instance.host = self.scheduler.select_hosts(candidates, request, 1)[0]
        except exception.NoValidHost:
            return None, transitions.no_other_host(host, reason)
        instance.attempts += 1
        instance.state, instance.reason = states.BUILDING, ''
        try:
            build = self._build_request(session, instance, deployment)
        except exception.AddressPoolExhausted as exc:
            # The new host has no DHCP server in the network and no address is left
            # for one: as if no host could take it.
            instance.host, instance.attempts = host, instance.attempts - 1
            return None, f'{transitions.no_other_host(host, reason)} ({exc})'
        LOG.info('instance %s failed on %s (%s); attempt %d on %s', instance.name, host,
                 reason, instance.attempts, instance.host)
        return Rebuild(build, networks.peer_updates(session, deployment.id,
                                                    instance.host)), ''

    def _cast_rebuild(self, rebuild: 'Rebuild') -> None:
        """The other hosts first learn of the new one, so that they flood to it by the
        time its guest starts."""
        for host, network_id, peers in rebuild.peers:
            try:
                self.compute.set_network_peers(host, network_id, peers)
            except exception.VmcloudError as exc:
                # Its guests reach the moved one again once a later move casts anew.
                LOG.error('cannot tell %s the peers of network %s: %s', host, network_id,
                          exc)
        self._cast_build(rebuild.build)

    def expire_builds(self, now: datetime.datetime) -> list[str]:
        """End every build past its deadline as a failed build (retried or error) whose
        host never answered. :returns: their ids. :raises: DatabaseError."""
        with self.db.session() as session:
            late = [(i.id, i.host) for i in db_api.instances_building_past(session, now)]
        reason = transitions.build_deadline_passed(self.conf.build_timeout)
        for instance_id, host in late:
            LOG.warning('instance %s on %s: %s', instance_id, host, reason)
            try:
                self.build_failed(instance_id, host, reason, cleaned=False)
            except exception.VmcloudError as exc:  # the others may still be ended
                LOG.error('cannot end the late build of %s on %s: %s', instance_id, host, exc)
            except Exception:  # a bug: the others may still be ended too
                LOG.exception('cannot end the late build of %s on %s', instance_id, host)
        return [instance_id for instance_id, _ in late]

    # -- what hosts report -------------------------------------------------------

    def hosts_silent(self, session: db_api.Session, hosts: list[str]) -> None:
        """Their active instances become unknown (see transitions.on_silent_host)."""
        self._settle(session, [i for host in hosts
                               for i in db_api.instances_on(session, host, (states.ACTIVE,))],
                     lambda instance: transitions.on_silent_host(instance.state, instance.host))

    def reconcile(self, session: db_api.Session, host: str, running: set[str]) -> list[str]:
        """Settle the host's instances against the guests it runs (transitions.on_report).

        :returns: the guests it runs that are not wanted there (moved, deleted, being
            deleted, or never known), to destroy after commit.
        """
        settled_before = models.utcnow() - datetime.timedelta(
            seconds=self.conf.heartbeat_interval)
        held = db_api.instances_on(session, host, states.HOLDING_STATES)
        self._settle(session, held, lambda instance: transitions.on_report(
            instance.state, instance.name in running, instance.updated_at < settled_before,
            host))
        wanted = {i.name for i in held if i.host == host and i.state in states.HOLDING_STATES
                  and i.state != states.DELETING}
        return sorted(running - wanted)

    def _settle(self, session: db_api.Session, instances: list[models.Instance],
                outcome: Callable[[models.Instance], transitions.Outcome | None]) -> None:
        """Apply ``outcome`` to each of ``instances`` it changes, each locked with its
        deployment, deployments in id order: every unit of work that locks several takes
        them in that order, so two hosts' reports cannot deadlock each other."""
        changing = sorted((i.deployment_id, i.id) for i in instances if outcome(i) is not None)
        for _, instance_id in changing:
            instance = db_api.instance_lock(session, instance_id)
            self._apply(session, instance, outcome(instance))  # as it is now, locked

    def destroy(self, host: str, names: list[str]) -> None:
        """Cast destroys; one that cannot be sent is logged (retried by a later heartbeat,
        which still lists the guest)."""
        for name in names:
            try:
                self.compute.destroy_instance(host, name)
            except exception.VmcloudError as exc:
                LOG.error('cannot tell %s to destroy %s: %s', host, name, exc)

    def instance_destroyed(self, host: str, name: str) -> None:
        """``host`` destroyed guest ``name``: a deleting instance is deleted, one in error
        holds nothing any more. :raises: DatabaseError."""
        with self.db.session() as session:
            found = db_api.instance_by_name(session, name)
            instance = found and db_api.instance_lock(session, found.id)
            if instance is None or instance.host != host:
                LOG.info('%s destroyed %s, not an instance of it', host, name)
                return
            if instance.state == states.DELETING:
                self._apply(session, instance, transitions.Outcome(states.DELETED))
            elif instance.state == states.ERROR:
                instance.host = None
            else:
                LOG.warning('%s destroyed instance %s, which is %s', host, name,
                            instance.state)

    def host_fenced(self, host: str) -> dict:
        """Every instance of a fenced host rebuilt elsewhere, or in error if none can take
        it; what was being deleted there is deleted (the host is dead).

        :returns: {'rebuilt': [names], 'failed': [names]}. :raises: DatabaseError.
        """
        reason = f'compute host {host} was fenced'
        with self.db.session() as session:
            instances = [(i.id, i.name, i.state)
                         for i in db_api.instances_on(session, host, states.HOLDING_STATES)]
        rebuilt, failed = [], []
        for instance_id, name, state in instances:
            if state == states.BUILDING:
                self.build_failed(instance_id, host, reason)
            else:
                self._rebuild(instance_id, host, reason)
            if state in states.RUNNING_STATES:
                with self.db.session() as session:
                    now = db_api.instance_get(session, instance_id).state
                (rebuilt if now == states.BUILDING else failed).append(name)
        LOG.warning('compute host %s fenced: %d instances rebuilt, %d failed', host,
                    len(rebuilt), len(failed))
        return {'rebuilt': rebuilt, 'failed': failed}

    def _rebuild(self, instance_id: str, host: str, reason: str) -> None:
        """A running (or unknown) instance of a fenced host: a new attempt elsewhere from
        its image, whatever attempts its first build took; one being deleted is deleted,
        one in error lets go of the host."""
        retry = None
        with self._claims, self.db.session() as session:
            instance = db_api.instance_lock(session, instance_id)
            if instance is None or instance.host != host:
                return
            if instance.state == states.DELETING:
                self._apply(session, instance, transitions.Outcome(states.DELETED))
                return
            if instance.state == states.ERROR:
                instance.host = None
                return
            if instance.state not in (states.ACTIVE, states.UNKNOWN):
                return
            deployment = db_api.deployment_get(session, instance.deployment_id)
            failed = transitions.failed_hosts(instance.failed_hosts, host)
            instance.failed_hosts = ','.join(failed)
            retry, why = self._place_again(session, instance, deployment, failed, host, reason)
            if retry is None:
                instance.state, instance.reason, instance.host = states.ERROR, why, None
            self.update_deployment(session, instance.deployment_id)
        if retry is not None:
            self._cast_rebuild(retry)

    def _apply(self, session: db_api.Session, instance: models.Instance,
               outcome: transitions.Outcome | None) -> None:
        if outcome is None or (outcome.state, outcome.reason) == (instance.state,
                                                                  instance.reason):
            return
        LOG.info('instance %s on %s: %s -> %s %s', instance.name, instance.host,
                 instance.state, outcome.state, outcome.reason)
        instance.state, instance.reason = outcome.state, outcome.reason
        if outcome.state == states.DELETED:
            # Its guest is confirmed gone: nothing uses its address or MAC any more.
            networks.release_port(session, instance)
        self.update_deployment(session, instance.deployment_id)

    def update_deployment(self, session: db_api.Session, deployment_id: str) -> None:
        """Derive the deployment's state from its instances' (a deleted one stays so).
        An instance of it changed: if it is exposed, the gateways are told once the
        session committed (an instance may have become active, or stopped being)."""
        deployment = db_api.deployment_get(session, deployment_id)
        if deployment.listener_port is not None:
            clouds.refresh_after_commit(session, self.gateway)
        if deployment.state == states.DELETED:
            return
        outcome = transitions.deployment(db_api.instance_state_counts(session, deployment_id),
                                         deployment.count, deployment.min_count)
        deployment.state = outcome.state
        if outcome.state != states.BUILDING:
            deployment.reason = outcome.reason

    def delete(self, deployment_id: str) -> dict:
        """Mark it deleted; every instance that may have a guest somewhere (error too) is
        deleting until its host confirms it destroyed, the others deleted.

        :raises: DeploymentNotFound, DatabaseError.
        """
        with self.db.session() as session:
            deployment = views.deployment(session, deployment_id, lock=True)
            deployment.state = states.DELETED
            doomed = collections.defaultdict(list)
            for instance in db_api.instances_of(session, deployment_id):
                if instance.host is not None and instance.state in states.HOLDING_STATES:
                    # Its port stays until the host confirms the guest destroyed.
                    instance.state = states.DELETING
                    doomed[instance.host].append(instance.name)
                else:
                    instance.state = states.DELETED
                    networks.release_port(session, instance)
                instance.deadline = None
            networks.release_network(session, deployment_id)
            if deployment.listener_port is not None:
                # Free for the next exposed deployment; the gateways drop the listener.
                deployment.listener_port = None
                clouds.refresh_after_commit(session, self.gateway)
        for host, names in doomed.items():
            self.destroy(host, names)
        self.notify('deployment.delete.end', {'id': deployment_id})
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)

    def console(self, instance_ref: str, max_bytes: int) -> dict:
        """The end of an instance's console log (``instance_ref``: its name or id), read by
        its host.

        :raises: InvalidRequest if there is no such instance, it is on no host, or its
            host is not up; MessagingError if the host does not answer.
        """
        with self.db.session() as session:
            instance = (db_api.instance_get(session, instance_ref)
                        or db_api.instance_by_name(session, instance_ref))
            if instance is None:
                raise exception.InvalidRequest(f'instance {instance_ref} not found')
            name, host, state = instance.name, instance.host, instance.state
            row = db_api.host_get(session, host) if host is not None else None
            host_state = row.state if row is not None else None
        if host is None or state == states.DELETED:
            raise exception.InvalidRequest(f'instance {name} is {state} on no host: no '
                                           f'console to read')
        if host_state != states.HOST_UP:
            # Asked anyway, a silent host would hold the request for the whole RPC
            # timeout, and the caller would blame the dispatcher.
            raise exception.InvalidRequest(f'instance {name} is on compute host {host}, '
                                           f'which is {host_state}: its console cannot be read')
        return {'instance': name, 'host': host,
                'console': self.compute.console_log(host, name, max_bytes)}


class Spec(NamedTuple):
    """What deploy places: one instance per image reference, of one size and boot, in
    one cloud, of an application (None: a plain deploy), with a service (port and
    protocol, or neither), for an owner (None: none)."""
    refs: list[str]
    min_count: int
    vcpus: int
    memory_mib: int
    boot: dict
    health: dict
    cloud: str
    application: str | None
    port: int | None
    protocol: str | None
    owner: str | None = None


class Rebuild(NamedTuple):
    """An instance placed again: its build request, and (host, network id, peers) for
    every other host running instances of its deployment."""
    build: dict
    peers: list[tuple[str, str, list[str]]]
