"""The whole cloud in one process: a dispatcher and compute managers on the fake:// transport."""
import dataclasses
import logging
import os
import secrets

from oslo_config import cfg

from vmcloud import exception
from vmcloud import network
from vmcloud import polling
from vmcloud import rpc
from vmcloud.compute import manager as compute_manager
from vmcloud.dispatcher import manager as dispatcher_manager
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.drivers import base as driver_base
from vmcloud.mirror import api as mirror_api
from vmcloud.network import agent as network_agent_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fetched:
    """Bytes of chunks the nodes' caches have had since they opened, by source."""
    repository_bytes: int  # read from the warehouse: what the repository paid
    peer_bytes: int  # had from another node's cache instead


class AllInOne:
    """``with AllInOne(conf, hosts=2) as cloud: cloud.api.deploy(...)``.

    Its nodes share one machine, so they share one network agent: the guests of a
    network, on whichever node, are ports of its one bridge (no VXLAN: no other host).

    With ``peers`` (by default when there is more than one node) the nodes' mirrors run
    the peer exchange over loopback, each its peer chunk server on 127.0.0.1 and a port
    of its own, and learn the peer set as compute nodes do, from the dispatcher
    (chunk_peers, after each heartbeat): an image's chunks are fetched from the
    warehouse once, whichever nodes read them.
    """

    def __init__(self, conf: cfg.ConfigOpts, hosts: int = 2, driver: str | None = None,
                 network_agent: network_agent_mod.NetworkAgent | None = None,
                 peers: bool | None = None):
        """``network_agent``: the nodes' (default: the one ``[network] agent`` names);
        ``peers``: whether the nodes exchange chunks (None: if ``hosts`` > 1; overrides
        [mirror] peer_address and peer_port)."""
        rpc.register_opts(conf)
        conf.set_override('transport_url', 'fake://')
        # One machine: no tunnel to make, and no peer to tell the dispatcher of.
        conf.set_override('vtep_address', '', 'network')
        self.peers = hosts > 1 if peers is None else peers
        # Every node's server on loopback; port 0: several nodes on one machine.
        conf.set_override('peer_address', '127.0.0.1' if self.peers else '', 'mirror')
        conf.set_override('peer_port', 0, 'mirror')
        if self.peers and not conf.mirror.peer_token:
            # One process knows every node's token: a random one closes the loopback
            # servers to the machine's other users at no cost.
            conf.set_override('peer_token', secrets.token_urlsafe(32), 'mirror')
        if driver is not None:
            conf.set_override('driver', driver, 'compute')
        self.conf = conf
        # Made here: the nodes' agent models its networks on them when it is the fake.
        drivers = [driver_base.load(conf) for _ in range(hosts)]
        self.network_agent = (network_agent if network_agent is not None
                              else network.load_agent(conf, drivers))
        self.warehouse = warehouse_mod.Warehouse(conf)
        self.dispatcher = dispatcher_manager.Dispatcher(conf, self.warehouse)
        self.mirrors: list[mirror_api.LocalMirrors] = []
        self.computes: list[compute_manager.ComputeManager] = []
        try:
            for i in range(hosts):
                root = os.path.join(conf.state_path, 'nodes', f'node{i + 1}')
                self.mirrors.append(mirror_api.LocalMirrors(conf, self.warehouse, root=root))
                # The nodes' drivers share [compute] instances_path: each sees them all.
                self.computes.append(compute_manager.ComputeManager(
                    conf, self.mirrors[-1], f'node{i + 1}', driver=drivers[i],
                    warehouse=self.warehouse, node_root=root, shared_driver=True,
                    network_agent=self.network_agent))
        except BaseException:
            self._close_mirrors()
            raise
        self.api = dispatcher_rpcapi.DispatcherAPI(conf)

    def start(self, timeout: float = 30) -> 'AllInOne':
        """:raises: as ComputeManager.start; MessagingError if the nodes do not report
        in within ``timeout`` s. Whatever started is stopped then: no ``with`` exits."""
        try:
            self.dispatcher.start()
            for compute in self.computes:
                compute.start()
            polling.wait(self.api.list_hosts,
                         lambda hosts: len([h for h in hosts if h['up']]) == len(self.computes),
                         timeout, 'the compute managers reporting in', interval=0.05,
                         error=exception.MessagingError)
            # Each node learns the whole peer set now rather than at its next heartbeat
            # (the first nodes' first ones came before the others registered).
            for compute in self.computes:
                compute.refresh_peers()
        except BaseException:
            self.stop()
            raise
        return self

    def fetched(self) -> Fetched:
        """What every node's mirrors fetched so far, from the warehouse and from peers
        apart: a chunk one node read from the warehouse and the others had from it is
        paid once by the repository, and counted once in ``repository_bytes``.

        :raises: MirrorError if a node's mirrors cannot tell (closed).
        """
        return Fetched(
            repository_bytes=sum(mirrors.fetched_bytes() for mirrors in self.mirrors),
            peer_bytes=sum(mirrors.peer_stats().get('peer_bytes', 0)
                           for mirrors in self.mirrors))

    def node(self, host: str) -> compute_manager.ComputeManager:
        """The compute manager called ``host``. :raises: HostNotFound."""
        for compute in self.computes:
            if compute.host == host:
                return compute
        raise exception.HostNotFound(host)

    def stop(self) -> None:
        """Every guest is destroyed: their disks are served from this process."""
        try:
            for compute in self.computes:
                compute.stop(destroy_instances=True)
            self.dispatcher.stop()
        finally:
            self._close_mirrors()

    def _close_mirrors(self) -> None:
        for mirrors in self.mirrors:
            try:
                mirrors.close()
            except exception.VmcloudError as exc:  # the other nodes' must close too
                LOG.error('cannot close the mirrors: %s', exc)

    def __enter__(self) -> 'AllInOne':
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
