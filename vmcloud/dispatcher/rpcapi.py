"""How clients (the CLI, compute managers, middleware) talk to the dispatcher."""
from typing import Callable

from oslo_config import cfg

from vmcloud import polling
from vmcloud import rpc
from vmcloud.dispatcher import states
from vmcloud.gateway import rpcapi as gateway_rpcapi

TOPIC = 'vmcloud-dispatcher'


def snapshot_seconds(conf: cfg.ConfigOpts) -> int:
    """How long a snapshot request may run: the waits of its cut (the freeze, the barrier,
    the thaw of an abort), and rpc_call_timeout for the rest. Its caller waits that long
    for the answer; an item still freezing after that long was never recorded."""
    return (2 * conf.snapshot_freeze_timeout + conf.snapshot_pause_limit
            + conf.rpc_call_timeout)


def _given(**arguments) -> dict:
    """The optional ``arguments`` that were given: a call without them is the call of
    before, which a dispatcher of before still takes."""
    return {name: value for name, value in arguments.items() if value is not None}


class DispatcherAPI:
    def __init__(self, conf: cfg.ConfigOpts, retry: int | None = None):
        """``retry=-1`` for services, whose reports must wait out a bus outage."""
        self._conf = conf
        self._client = rpc.Client(conf, TOPIC, 'dispatcher', retry)

    # -- for clients -------------------------------------------------------------

    def ping(self, timeout: float | None = None) -> dict:
        """:returns: {'host': the dispatcher's host}. :raises: MessagingError naming the
        dispatcher if it does not answer within ``timeout`` s ([DEFAULT] rpc_call_timeout)."""
        return self._client.call('ping', timeout=timeout)

    def deploy(self, image: str, count: int, min_count: int | None = None, vcpus: int = 1,
               memory_mib: int = 256, boot: dict | None = None,
               health: dict | None = None, cloud: str = 'default', port: int | None = None,
               protocol: str | None = None, owner: str | None = None) -> dict:
        """Deploy ``count`` instances of ``image`` (all or at least ``min_count``).

        ``boot`` may name a ``kernel``, ``initrd`` and ``cmdline`` (``{name}`` in
        it becomes the instance's name). The kernel and initrd are warehouse images
        ``NAME[:VERSION]``, which the deployment pins to the version they name now
        (every instance and rebuild boots the same bytes), or absolute paths of
        files that exist on every compute node.

        ``health`` says when an instance is ready: {'kind': 'marker'} (the default: the
        guest prints vmcloud's boot-done marker), {'kind': 'tcp', 'port': N}, {'kind':
        'http', 'port': N, 'path': '/...'} (answers below 500) or {'kind': 'console',
        'pattern': REGEX} (a console line matches), each with an optional 'timeout' (s).

        Every deployment gets a network of its own; each instance an address and MAC in
        it (shown as the deployment's 'network' and each instance's 'address', 'mac').

        The instances go on hosts of ``cloud`` (all hosts if it lists none). With
        ``port`` and ``protocol`` ('http' | 'tcp'), both or neither, the service on
        that port of the guests is exposed on the gateway: the deployment shows its
        'listener_port'. ``owner``: the API user it is deployed for, shown as its
        'owner' (None: none).

        :raises: ImageNotFound, NoValidHost, InvalidRequest, CloudNotFound,
            AddressPoolExhausted (no subnet, VNI or address left: the message names the
            pool), ListenerPortsExhausted (naming the range), MessagingError.
        """
        return self._client.call('deploy', image=image, count=count, min_count=min_count,
                                 vcpus=vcpus, memory_mib=memory_mib, boot=boot or {},
                                 health=health, cloud=cloud, port=port, protocol=protocol,
                                 **_given(owner=owner))

    def deploy_application(self, application: str, cloud: str, count: int,
                           min_count: int | None = None, owner: str | None = None) -> dict:
        """``count`` instances (all or at least ``min_count``) of an application in
        ``cloud``, as ``deploy`` with the application's image (its version of now),
        boot, health check, size and service: the deployment shows its
        'listener_port'. ``owner`` as for ``deploy``.

        :raises: ApplicationNotFound, CloudNotFound, InvalidRequest, ImageNotFound,
            NoValidHost, AddressPoolExhausted, ListenerPortsExhausted, MessagingError.
        """
        return self._client.call('deploy_application', application=application, cloud=cloud,
                                 count=count, min_count=min_count, **_given(owner=owner))

    def deploy_snapshot(self, snapshot_id: str, boot: dict | None = None,
                        allow_partial: bool = False, owner: str | None = None) -> dict:
        """One instance per instance of a finished snapshot, each from its own version;
        ``boot`` as for ``deploy``, by default the snapshotted deployment's; ``owner``
        as for ``deploy``.

        :raises: SnapshotNotFound; InvalidRequest naming the missing instances if the
            snapshot is partial and not ``allow_partial``.
        """
        return self._client.call('deploy_snapshot', snapshot_id=snapshot_id, boot=boot or {},
                                 allow_partial=allow_partial, **_given(owner=owner))

    def list_deployments(self, limit: int | None = None, marker: str | None = None,
                         cloud: str | None = None, owner: str | None = None) -> list[dict]:
        """Every deployment (in ``cloud``, of ``owner``, if given), newest first: at most
        ``limit`` of them, after the one of id ``marker`` (the last of the page before).

        :raises: MarkerNotFound if no deployment has the id ``marker``.
        """
        return self._client.call('list_deployments', **_given(
            limit=limit, marker=marker, cloud=cloud, owner=owner))

    def show_deployment(self, deployment_id: str) -> dict:
        return self._client.call('show_deployment', deployment_id=deployment_id)

    def delete_deployment(self, deployment_id: str) -> dict:
        return self._client.call('delete_deployment', deployment_id=deployment_id)

    def snapshot(self, deployment_id: str) -> dict:
        """Snapshot every active instance of a deployment at one barrier; waits out the
        cut (a longer pause limit is no reason to give up on the answer and its id)."""
        return self._client.call('snapshot', timeout=snapshot_seconds(self._conf),
                                 deployment_id=deployment_id)

    def show_snapshot(self, snapshot_id: str) -> dict:
        """:raises: SnapshotNotFound."""
        return self._client.call('show_snapshot', snapshot_id=snapshot_id)

    def list_snapshots(self, deployment_id: str | None = None, limit: int | None = None,
                       marker: str | None = None) -> list[dict]:
        """Every snapshot (of one deployment if given), newest first: at most ``limit``
        of them, after the one of id ``marker``.

        :raises: DeploymentNotFound, MarkerNotFound.
        """
        return self._client.call('list_snapshots', deployment_id=deployment_id,
                                 **_given(limit=limit, marker=marker))

    def console(self, instance: str, max_bytes: int = 65536) -> dict:
        """The end of an instance's console log, read by its compute host.

        ``instance``: its name or id. :returns: {'instance': name, 'host', 'console': str}.
        :raises: InvalidRequest if there is no such instance or it is on no host;
            MessagingError naming the host if it does not answer.
        """
        # The dispatcher waits rpc_call_timeout for the host: waiting as long here, the
        # caller would blame the dispatcher for a host that does not answer.
        return self._client.call('console', timeout=2 * self._conf.rpc_call_timeout,
                                 instance=instance, max_bytes=max_bytes)

    def fence_host(self, host: str) -> dict:
        """The operator says ``host`` is dead: its instances are rebuilt elsewhere (or end
        in error), and it takes no new ones until it registers again.

        :returns: {'host', 'state', 'rebuilt': [names], 'failed': [names]}.
        :raises: HostNotFound.
        """
        return self._client.call('fence_host', host=host)

    def wait_deployment(self, deployment_id: str, timeout: float,
                        on_poll: Callable[[dict], None] | None = None) -> dict:
        """The deployment once no instance of it is building; ``on_poll`` sees each look.

        :raises: VmcloudError naming the deployment if that takes over ``timeout`` s.
        """
        def poll() -> dict:
            deployment = self.show_deployment(deployment_id)
            if on_poll is not None:
                on_poll(deployment)
            return deployment
        return polling.wait(poll, lambda d: d['state'] != states.BUILDING, timeout,
                            f'deployment {deployment_id}')

    def wait_snapshot(self, snapshot_id: str, timeout: float) -> dict:
        """The snapshot once every upload ended. :raises: VmcloudError on timeout."""
        return polling.wait(lambda: self.show_snapshot(snapshot_id),
                            lambda s: s['state'] not in (states.FREEZING, states.UPLOADING),
                            timeout,
                            f'snapshot {snapshot_id}')

    def list_hosts(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """By name: at most ``limit`` of them, after the one named ``marker``.

        :raises: MarkerNotFound."""
        return self._client.call('list_hosts', **_given(limit=limit, marker=marker))

    # -- clouds and applications ---------------------------------------------------

    def create_cloud(self, name: str, connection_limit: int,
                     hosts: list[str] | None = None) -> dict:
        """A cloud ``name`` ([a-z0-9-]{1,32}) of ``hosts`` (none: every host), whose
        deployments' listeners hold at most ``connection_limit`` connections at once.

        :returns: {'name', 'connection_limit', 'created_at', 'hosts', 'deployments'}.
        :raises: InvalidRequest (a bad name or limit), NameInUse (the name is taken),
            HostNotFound.
        """
        return self._client.call('create_cloud', name=name, connection_limit=connection_limit,
                                 hosts=list(hosts or []))

    def update_cloud(self, name: str, connection_limit: int | None = None,
                     add_hosts: list[str] | None = None,
                     remove_hosts: list[str] | None = None) -> dict:
        """A new limit holds at once on the gateway; host changes hold for instances
        placed from now on. :raises: CloudNotFound, InvalidRequest, HostNotFound."""
        return self._client.call('update_cloud', name=name, connection_limit=connection_limit,
                                 add_hosts=list(add_hosts or []),
                                 remove_hosts=list(remove_hosts or []))

    def show_cloud(self, name: str) -> dict:
        """:raises: CloudNotFound."""
        return self._client.call('show_cloud', name=name)

    def list_clouds(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """By name: at most ``limit`` of them, after the one named ``marker``.

        :raises: MarkerNotFound."""
        return self._client.call('list_clouds', **_given(limit=limit, marker=marker))

    def delete_cloud(self, name: str) -> dict:
        """:returns: the cloud as it was. :raises: CloudNotFound; InUse for the default
        cloud or while a deployment in it is not deleted."""
        return self._client.call('delete_cloud', name=name)

    def create_application(self, name: str, image: str, port: int, protocol: str,
                           vcpus: int = 1, memory_mib: int = 256, boot: dict | None = None,
                           health: dict | None = None,
                           connection_limit: int | None = None) -> dict:
        """An application ``name`` ([a-z0-9-]{1,64}): ``image`` (IMAGE[:VERSION]),
        ``boot`` and ``health`` as deploy's, ``vcpus`` and ``memory_mib`` per
        instance, its service ``port`` (1-65535) and ``protocol`` ('http' | 'tcp'),
        at most ``connection_limit`` connections at once (None: its cloud's only).

        :returns: its columns, boot and health decoded, and 'deployments' (ids).
        :raises: InvalidRequest, NameInUse, ImageNotFound.
        """
        return self._client.call('create_application', name=name, image=image, port=port,
                                 protocol=protocol, vcpus=vcpus, memory_mib=memory_mib,
                                 boot=boot or {}, health=health,
                                 connection_limit=connection_limit)

    def show_application(self, name: str) -> dict:
        """:raises: ApplicationNotFound."""
        return self._client.call('show_application', name=name)

    def update_application(self, name: str, changes: dict) -> dict:
        """Change any of 'image', 'port', 'protocol', 'vcpus', 'memory_mib', 'boot',
        'health', 'connection_limit' (None: its cloud's only), checked as
        create_application checks them. Deployments from now on use the application
        as it is now; a new limit holds at once on the gateway.

        :returns: the application, as show_application.
        :raises: ApplicationNotFound, InvalidRequest, ImageNotFound.
        """
        return self._client.call('update_application', name=name, changes=dict(changes))

    def list_applications(self, limit: int | None = None,
                          marker: str | None = None) -> list[dict]:
        """By name: at most ``limit`` of them, after the one named ``marker``.

        :raises: MarkerNotFound."""
        return self._client.call('list_applications', **_given(limit=limit, marker=marker))

    def delete_application(self, name: str) -> dict:
        """:returns: the application as it was. :raises: ApplicationNotFound; InUse
        while a deployment of it is not deleted."""
        return self._client.call('delete_application', name=name)

    # -- monitoring ----------------------------------------------------------------

    def monitoring(self) -> dict:
        """What the dispatcher counts of the cloud, from its database:

        {'clouds': {name: {'connection_limit', 'hosts': [names] ([]: every host),
                           'hosts_up', 'hosts_total',
                           'deployments': {state: n}, 'instances': {state: n},
                           'applications_deployed': [names],
                           'applications_running': [names]}},
         'deployments': {state: n}, 'instances': {state: n},
         'hosts': {name: {'state', 'up', 'cpus', 'cpu_busy', 'cache_bytes',
                          'fetched_bytes', 'peer_bytes', 'instances'}}}

        A cloud's counts leave deleted deployments and instances out; the totals count
        every state. Connections are the gateway's (gateway_stats, gateway_connections).
        """
        return self._client.call('monitoring')

    def recent_events(self, limit: int = 50) -> list[dict]:
        """The events the dispatcher sent of late (it keeps [DEFAULT] event_history of
        them, in memory), newest first: [{'at': ISO time (UTC), 'event', 'payload'}]."""
        return self._client.call('recent_events', limit=limit)

    # -- the gateway ---------------------------------------------------------------

    def gateway_connections(self, cloud: str | None = None) -> list[dict]:
        """The connections the gateway holds now (of ``cloud`` if given): [{'client',
        'client_port', 'cloud', 'application', 'deployment', 'instance',
        'listener_port', 'started_at'}].

        :raises: CloudNotFound; GatewayUnavailable if no registered gateway answers.
        """
        return self._client.call('gateway_connections', timeout=self._gateway_timeout(),
                                 cloud=cloud)

    def gateway_stats(self, cloud: str | None = None) -> dict:
        """The gateway's counters of each cloud (of ``cloud`` if given): see
        vmcloud.gateway.rpcapi.GatewayAPI.stats.

        :raises: CloudNotFound; GatewayUnavailable if no registered gateway answers.
        """
        return self._client.call('gateway_stats', timeout=self._gateway_timeout(),
                                 cloud=cloud)

    def _gateway_timeout(self) -> float:
        # The dispatcher waits up to ANSWER_TIMEOUT for each gateway (one in practice,
        # a second one gone): its own answer is worth waiting that long for.
        return self._conf.rpc_call_timeout + 2 * gateway_rpcapi.ANSWER_TIMEOUT

    # -- for gateways ----------------------------------------------------------------

    def register_gateway(self, name: str, vtep_address: str = '') -> dict:
        """Gateway ``name`` starts serving; the compute hosts flood the networks of
        exposed deployments to its ``vtep_address`` ('' for none).

        :returns: gateway_state. :raises: InvalidRequest if ``vtep_address`` is not an
            IP address.
        """
        return self._client.call('register_gateway', name=name, vtep_address=vtep_address)

    def gateway_state(self) -> dict:
        """Everything a gateway serves:

        {'clouds': {name: {'connection_limit': int}},
         'applications': {name: {'connection_limit': int | None}},
         'hosts': {name: {'cpus', 'cpu_busy', 'vcpus', 'vcpus_used', 'memory_mib',
                          'memory_mib_used', 'up'}},
         'listeners': [{'deployment', 'cloud', 'application', 'listener_port',
                        'protocol', 'port', 'network': {'id', 'vni', 'cidr'},
                        'peers': [VTEP addresses of its hosts],
                        'instances': [{'id', 'name', 'host', 'address', 'state'}]}]}

        A listener's instances are its active ones only.
        """
        return self._client.call('gateway_state')

    # -- for compute managers ------------------------------------------------------

    def register_host(self, host: str, node_id: str, incarnation: str, capacity: dict,
                      vtep_address: str = '', peer_url: str = '') -> dict:
        """A compute manager starting on node ``node_id`` claims the name ``host``; other
        hosts' VXLAN devices send its guests' frames to ``vtep_address`` ('' for none);
        other hosts' mirrors ask its mirrors for chunks at ``peer_url``
        (http://HOST[:PORT], '' for none: the node takes no part in the peer exchange).

        :returns: {'instances': [{'id', 'name', 'state', 'attempts', 'image', 'network':
            {'id', 'vni', 'cidr'} | None, 'port': {'mac', 'address'} | None}]}: what the
            dispatcher has on this host (running or still holding its resources), for the
            manager to adopt or clean up.
        :raises: HostNameInUse if another node holds the name and is alive;
            InvalidRequest naming a ``vtep_address`` that is no IP address or a
            ``peer_url`` that is not http://HOST[:PORT].
        """
        # Without a peer URL, the call of before, which a dispatcher of before takes.
        return self._client.call('register_host', host=host, node_id=node_id,
                                 incarnation=incarnation, capacity=capacity,
                                 vtep_address=vtep_address,
                                 **_given(peer_url=peer_url or None))

    def chunk_peers(self, timeout: float | None = None) -> dict[str, str]:
        """The nodes of the peer exchange now: {host: peer URL} of every compute host
        that is up (not silent for service_down_time, not fenced) and registered a
        peer URL. Each compute manager asks after each heartbeat and hands the set to
        its mirrors (Mirrors.set_peers), which stripe the chunks over it.

        :raises: MessagingError if the dispatcher does not answer within ``timeout`` s
            ([DEFAULT] rpc_call_timeout) or is one of before, which does not offer it.
        """
        return self._client.call('chunk_peers', timeout=timeout)

    def report_heartbeat(self, host: str, capacity: dict, incarnation: str,
                         running: list[str]) -> None:
        """``running``: the names of every guest the host runs."""
        self._client.cast('report_heartbeat', host=host, capacity=capacity,
                          incarnation=incarnation, running=running)

    def build_wanted(self, instance_id: str, host: str, attempt: int) -> bool:
        """Whether a build request is still current: the instance is building on ``host``
        in that attempt (not moved, deleted, or retried since)."""
        return self._client.call('build_wanted', instance_id=instance_id, host=host,
                                 attempt=attempt)

    def instance_destroyed(self, host: str, name: str) -> None:
        """``host`` destroyed guest ``name``: what it held is free."""
        self._client.cast('instance_destroyed', host=host, name=name)

    def instance_built(self, instance_id: str, host: str, boot_seconds: float,
                       fetched_bytes: int) -> None:
        self._client.cast('instance_built', instance_id=instance_id, host=host,
                          boot_seconds=boot_seconds, fetched_bytes=fetched_bytes)

    def build_failed(self, instance_id: str, host: str, reason: str) -> None:
        self._client.cast('build_failed', instance_id=instance_id, host=host, reason=reason)

    def snapshot_item_done(self, snapshot_id: str, instance_id: str, version: str,
                           uploaded_bytes: int, error: str = '', persistent: bool = True) -> None:
        """``persistent``: every chunk the upload wrote is in the repository (not only on
        peers). Sent only when false, so a dispatcher of before takes the others."""
        extra = {} if persistent else {'persistent': False}
        self._client.cast('snapshot_item_done', snapshot_id=snapshot_id,
                          instance_id=instance_id, version=version,
                          uploaded_bytes=uploaded_bytes, error=error, **extra)

    def snapshot_items_persisted(self, snapshot_id: str, instance_ids: list[str]) -> None:
        """A host wrote these items' chunks to the repository (the dispatcher checks)."""
        self._client.cast('snapshot_items_persisted', snapshot_id=snapshot_id,
                          instance_ids=list(instance_ids))
