"""The dispatcher service: its RPC endpoints, and the parts they hand each request to.

- ``hosts``: registration, heartbeats and their reconciliation, fencing, free capacity,
  the monitor that marks silent hosts unknown and ends what is past its deadline;
- ``deploy``: placing, building, retrying and deleting instances;
- ``snapshot``: the barrier across hosts and the uploads;
- ``clouds``: clouds, applications, listener ports, what the gateways serve;
- ``monitoring``: counts per cloud and state, the events sent of late;
- ``transitions``: what a deployment, snapshot or instance becomes (no database);
- ``views``: rows as the dicts the endpoints answer;
- every SQL statement is a named function of ``vmcloud.db.api``.
"""
import json
import logging

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.compute import artifacts
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.db import api as db_api
from vmcloud.dispatcher import clouds as clouds_mod
from vmcloud.dispatcher import deploy as deploy_mod
from vmcloud.dispatcher import hosts as hosts_mod
from vmcloud.dispatcher import monitoring as monitoring_mod
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.dispatcher import snapshot as snapshot_mod
from vmcloud.dispatcher import views
from vmcloud.gateway import rpcapi as gateway_rpcapi
from vmcloud.scheduler import handler
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)


class Dispatcher:
    """API entry, filter scheduler and global manager; one per cloud."""

    def __init__(self, conf: cfg.ConfigOpts, warehouse: warehouse_mod.Warehouse | None = None):
        self.conf = conf
        self.warehouse = warehouse or warehouse_mod.Warehouse(conf)
        self.db = db_api.Database(conf)
        self.db.upgrade()
        self.scheduler = handler.FilterScheduler(conf)
        self.compute = compute_rpcapi.ComputeAPI(conf)
        self.gateway = gateway_rpcapi.GatewayAPI(conf)
        self.notifier = rpc.notifier(conf, f'dispatcher.{conf.host}')
        self.events = monitoring_mod.EventHistory(conf.event_history)
        self.deployer = deploy_mod.Deployer(conf, self.db, self.scheduler, self.compute,
                                            self._notify, self.gateway)
        self.clouds = clouds_mod.Clouds(conf, self.db, self.gateway, self.compute)
        self.hosts = hosts_mod.HostRegistry(conf, self.db, self.deployer)
        self.snapshots = snapshot_mod.Snapshotter(conf, self.db, self.compute, self._notify,
                                                  self.warehouse)
        self.monitor = hosts_mod.HostMonitor(conf, self.db, self.deployer,
                                             self.snapshots.expire)
        self._server = rpc.server(conf, dispatcher_rpcapi.TOPIC, conf.host, [self])

    def start(self) -> 'Dispatcher':
        # Before any request: a barrier a previous dispatcher left half done is ended.
        self.snapshots.recover()
        self._server.start()
        self.monitor.start()
        return self

    def stop(self) -> None:
        self.monitor.stop()
        self._server.stop()
        self._server.wait()
        self.db.dispose()

    def _notify(self, event: str, payload: dict) -> None:
        self.events.record(event, payload)
        try:
            self.notifier.info({}, event, payload)
        except Exception as exc:  # a notification must never fail the operation
            LOG.warning('notification %s not sent: %s', event, exc)

    # -- hosts -------------------------------------------------------------------

    @rpc.expose
    def ping(self, ctxt: dict) -> dict:
        return {'host': self.conf.host}

    @rpc.expose
    def register_host(self, ctxt: dict, host: str, node_id: str, incarnation: str,
                      capacity: dict, vtep_address: str = '', peer_url: str = '') -> dict:
        """:raises: HostNameInUse if another live node holds the name; InvalidRequest
        (a bad VTEP address or peer URL)."""
        return {'instances': self.hosts.register(host, node_id, incarnation, capacity,
                                                 vtep_address, peer_url)}

    @rpc.expose
    def chunk_peers(self, ctxt: dict) -> dict[str, str]:
        """{host: peer URL} of every host up with one (HostRegistry.chunk_peers)."""
        return self.hosts.chunk_peers()

    @rpc.expose
    def report_heartbeat(self, ctxt: dict, host: str, capacity: dict, incarnation: str,
                         running: list[str]) -> None:
        self.hosts.report_heartbeat(host, capacity, incarnation, running)

    @rpc.expose
    def fence_host(self, ctxt: dict, host: str) -> dict:
        """:raises: HostNotFound."""
        return self.hosts.fence(host)

    @rpc.expose
    def list_hosts(self, ctxt: dict, limit: int | None = None,
                   marker: str | None = None) -> list[dict]:
        """:raises: MarkerNotFound."""
        return self.hosts.list_hosts(limit, marker)

    # -- deploying ---------------------------------------------------------------

    @rpc.expose
    def deploy(self, ctxt: dict, image: str, count: int, min_count: int | None, vcpus: int,
               memory_mib: int, boot: dict, health: dict | None = None,
               cloud: str = clouds_mod.DEFAULT, port: int | None = None,
               protocol: str | None = None, owner: str | None = None) -> dict:
        """``boot``'s kernel and initrd, if images, are pinned to their versions of now;
        with ``port`` and ``protocol`` (both or neither) the deployment gets a listener
        port on the gateway.

        :raises: InvalidRequest, CloudNotFound, ImageNotFound, NoValidHost,
            AddressPoolExhausted, ListenerPortsExhausted.
        """
        min_count = _counts(count, min_count, vcpus, memory_mib)
        ref = str(self.warehouse.lookup(image).ref)
        return self.deployer.deploy([ref] * count, min_count, vcpus, memory_mib,
                                    artifacts.pinned(boot, self.warehouse.lookup), health,
                                    cloud=cloud, port=port, protocol=protocol, owner=owner)

    @rpc.expose
    def deploy_application(self, ctxt: dict, application: str, cloud: str, count: int,
                           min_count: int | None = None, owner: str | None = None) -> dict:
        """``count`` instances of the application in ``cloud``, as ``deploy`` with its
        image (its version of now), boot, health check, size and service: the
        deployment gets a listener port.

        :raises: ApplicationNotFound, CloudNotFound, InvalidRequest, ImageNotFound,
            NoValidHost, AddressPoolExhausted, ListenerPortsExhausted.
        """
        with self.db.session() as session:
            app = clouds_mod.application(session, application)
            min_count = _counts(count, min_count, app.vcpus, app.memory_mib)
            image, vcpus, memory_mib = app.image, app.vcpus, app.memory_mib
            boot, health = json.loads(app.boot), json.loads(app.health) or None
            port, protocol = app.port, app.protocol
        ref = str(self.warehouse.lookup(image).ref)
        return self.deployer.deploy([ref] * count, min_count, vcpus, memory_mib,
                                    artifacts.pinned(boot, self.warehouse.lookup), health,
                                    cloud=cloud, application=application, port=port,
                                    protocol=protocol, owner=owner)

    @rpc.expose
    def deploy_snapshot(self, ctxt: dict, snapshot_id: str, boot: dict,
                        allow_partial: bool = False, owner: str | None = None) -> dict:
        """One instance per stored version, all or none; ``boot`` (by default the
        snapshotted deployment's) pinned as by ``deploy``; the snapshotted deployment's
        health check.

        :raises: SnapshotNotFound, InvalidRequest (a partial snapshot without
            ``allow_partial`` names the missing instances), ImageNotFound, NoValidHost,
            AddressPoolExhausted.
        """
        refs, deployment_id = self.snapshots.stored_versions(snapshot_id, allow_partial)
        # A version removed since (nothing holds a finished snapshot's) fails the request
        # here, naming it, and writes nothing, rather than every build on every host.
        refs = [str(self.warehouse.lookup(ref).ref) for ref in refs]
        with self.db.session() as session:
            deployment = views.deployment(session, deployment_id)
            vcpus, memory_mib = deployment.vcpus, deployment.memory_mib
            boot = boot or json.loads(deployment.boot)
            health = json.loads(deployment.health) or None
        # Pinned again: a version the old deployment pinned may have been deleted since.
        return self.deployer.deploy(refs, len(refs), vcpus, memory_mib,
                                    artifacts.pinned(boot, self.warehouse.lookup), health,
                                    owner=owner)

    @rpc.expose
    def instance_built(self, ctxt: dict, instance_id: str, host: str, boot_seconds: float,
                       fetched_bytes: int) -> None:
        self.deployer.instance_built(instance_id, host, boot_seconds, fetched_bytes)

    @rpc.expose
    def build_failed(self, ctxt: dict, instance_id: str, host: str, reason: str) -> None:
        """Retry on another host, up to [scheduler] max_attempts; then ERROR with the reason."""
        self.deployer.build_failed(instance_id, host, reason)

    @rpc.expose
    def build_wanted(self, ctxt: dict, instance_id: str, host: str, attempt: int) -> bool:
        return self.deployer.build_wanted(instance_id, host, attempt)

    @rpc.expose
    def instance_destroyed(self, ctxt: dict, host: str, name: str) -> None:
        self.deployer.instance_destroyed(host, name)

    @rpc.expose
    def console(self, ctxt: dict, instance: str, max_bytes: int = 65536) -> dict:
        """:raises: InvalidRequest if there is no such instance or it is on no host;
            MessagingError if its host does not answer."""
        return self.deployer.console(instance, max_bytes)

    # -- reading -----------------------------------------------------------------

    @rpc.expose
    def show_deployment(self, ctxt: dict, deployment_id: str) -> dict:
        """:raises: DeploymentNotFound."""
        with self.db.session() as session:
            return views.show_deployment(session, deployment_id)

    @rpc.expose
    def list_deployments(self, ctxt: dict, limit: int | None = None,
                         marker: str | None = None, cloud: str | None = None,
                         owner: str | None = None) -> list[dict]:
        """:raises: MarkerNotFound."""
        with self.db.session() as session:
            return views.list_deployments(session, limit, marker, cloud, owner)

    @rpc.expose
    def delete_deployment(self, ctxt: dict, deployment_id: str) -> dict:
        """:raises: DeploymentNotFound."""
        return self.deployer.delete(deployment_id)

    # -- clouds and applications -------------------------------------------------

    @rpc.expose
    def create_cloud(self, ctxt: dict, name: str, connection_limit: int,
                     hosts: list[str] | None = None) -> dict:
        """:raises: InvalidRequest, NameInUse, HostNotFound."""
        return self.clouds.create_cloud(name, connection_limit, hosts)

    @rpc.expose
    def update_cloud(self, ctxt: dict, name: str, connection_limit: int | None = None,
                     add_hosts: list[str] | None = None,
                     remove_hosts: list[str] | None = None) -> dict:
        """:raises: CloudNotFound, InvalidRequest, HostNotFound."""
        return self.clouds.update_cloud(name, connection_limit, add_hosts, remove_hosts)

    @rpc.expose
    def show_cloud(self, ctxt: dict, name: str) -> dict:
        """:raises: CloudNotFound."""
        return self.clouds.show_cloud(name)

    @rpc.expose
    def list_clouds(self, ctxt: dict, limit: int | None = None,
                    marker: str | None = None) -> list[dict]:
        """:raises: MarkerNotFound."""
        return self.clouds.list_clouds(limit, marker)

    @rpc.expose
    def delete_cloud(self, ctxt: dict, name: str) -> dict:
        """:raises: CloudNotFound; InUse for default or a cloud in use."""
        return self.clouds.delete_cloud(name)

    @rpc.expose
    def create_application(self, ctxt: dict, name: str, image: str, port: int, protocol: str,
                           vcpus: int, memory_mib: int, boot: dict | None = None,
                           health: dict | None = None,
                           connection_limit: int | None = None) -> dict:
        """Its image, boot artifacts and health check are checked as deploy checks
        them (each deploy pins the versions of then).

        :raises: InvalidRequest, NameInUse, ImageNotFound.
        """
        checked = deploy_mod.check_artifacts({'image': image, 'boot': boot, 'health': health},
                                             self.warehouse.lookup, self.conf.build_timeout)
        return self.clouds.create_application(name, image, port, protocol, vcpus, memory_mib,
                                              checked['boot'], checked['health'],
                                              connection_limit)

    @rpc.expose
    def update_application(self, ctxt: dict, name: str, changes: dict) -> dict:
        """Checked as create_application checks them (the artifacts changed, the whole).

        :raises: ApplicationNotFound, InvalidRequest, ImageNotFound.
        """
        checked = deploy_mod.check_artifacts(changes, self.warehouse.lookup,
                                             self.conf.build_timeout)
        return self.clouds.update_application(name, checked)

    @rpc.expose
    def show_application(self, ctxt: dict, name: str) -> dict:
        """:raises: ApplicationNotFound."""
        return self.clouds.show_application(name)

    @rpc.expose
    def list_applications(self, ctxt: dict, limit: int | None = None,
                          marker: str | None = None) -> list[dict]:
        """:raises: MarkerNotFound."""
        return self.clouds.list_applications(limit, marker)

    @rpc.expose
    def delete_application(self, ctxt: dict, name: str) -> dict:
        """:raises: ApplicationNotFound; InUse while it is deployed."""
        return self.clouds.delete_application(name)

    # -- gateways ----------------------------------------------------------------

    @rpc.expose
    def register_gateway(self, ctxt: dict, name: str, vtep_address: str = '') -> dict:
        """:returns: gateway_state. :raises: InvalidRequest (a bad VTEP address)."""
        return self.clouds.register_gateway(name, vtep_address)

    @rpc.expose
    def gateway_state(self, ctxt: dict) -> dict:
        return self.clouds.gateway_state()

    @rpc.expose
    def gateway_connections(self, ctxt: dict, cloud: str | None = None) -> list[dict]:
        """:raises: CloudNotFound, GatewayUnavailable."""
        return self.clouds.gateway_connections(cloud)

    @rpc.expose
    def gateway_stats(self, ctxt: dict, cloud: str | None = None) -> dict:
        """:raises: CloudNotFound, GatewayUnavailable."""
        return self.clouds.gateway_stats(cloud)

    # -- snapshots ---------------------------------------------------------------

    @rpc.expose
    def snapshot(self, ctxt: dict, deployment_id: str) -> dict:
        """Freeze every active instance, take each dirty set at that one cut, thaw all,
        upload."""
        return self.snapshots.snapshot(deployment_id)

    @rpc.expose
    def snapshot_item_done(self, ctxt: dict, snapshot_id: str, instance_id: str, version: str,
                           uploaded_bytes: int, error: str, persistent: bool = True) -> None:
        self.snapshots.item_done(snapshot_id, instance_id, version, uploaded_bytes, error,
                                 persistent)

    @rpc.expose
    def snapshot_items_persisted(self, ctxt: dict, snapshot_id: str,
                                 instance_ids: list[str]) -> None:
        self.snapshots.items_persisted(snapshot_id, instance_ids)

    @rpc.expose
    def show_snapshot(self, ctxt: dict, snapshot_id: str) -> dict:
        """:raises: SnapshotNotFound."""
        return self.snapshots.show(snapshot_id)

    @rpc.expose
    def list_snapshots(self, ctxt: dict, deployment_id: str | None = None,
                       limit: int | None = None, marker: str | None = None) -> list[dict]:
        """:raises: DeploymentNotFound, MarkerNotFound."""
        return self.snapshots.list(deployment_id, limit, marker)

    # -- monitoring --------------------------------------------------------------

    @rpc.expose
    def monitoring(self, ctxt: dict) -> dict:
        """See vmcloud.dispatcher.monitoring.monitoring."""
        with self.db.session() as session:
            return monitoring_mod.monitoring(session)

    @rpc.expose
    def recent_events(self, ctxt: dict, limit: int = 50) -> list[dict]:
        return self.events.recent(limit)


def _counts(count: int, min_count: int | None, vcpus: int, memory_mib: int) -> int:
    """:returns: ``min_count``, ``count`` if None. :raises: InvalidRequest."""
    if count < 1 or vcpus < 1 or memory_mib < 1:
        raise exception.InvalidRequest(
            f'count, vcpus and memory must be at least 1 (got {count}, {vcpus}, '
            f'{memory_mib})')
    min_count = count if min_count is None else min_count
    if not 1 <= min_count <= count:
        raise exception.InvalidRequest(f'min count {min_count} must be between 1 and {count}')
    return min_count
