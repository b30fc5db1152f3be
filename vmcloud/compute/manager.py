"""The compute manager: builds instances on the node's mirrors, snapshots them, reports to
the dispatcher.

The guests' disks are served by the node's mirrors (``vmcloud.mirror.api.Mirrors``): in
the node's mirror service for ``vmcloud compute``, so that stopping, restarting or
upgrading the manager leaves every guest running on its disk. A manager that starts
registers with the dispatcher under the node's persistent id and a fresh incarnation,
then adopts or cleans up every guest and mirror it finds (``_adopt``).
"""
import collections
import concurrent.futures
import dataclasses
import logging
import os
import re
import shutil
import threading
import time
import uuid
from typing import Callable, Iterable

from oslo_config import cfg

from vmcloud import exception
from vmcloud import network as network_mod
from vmcloud import rpc
from vmcloud.compute import artifacts as artifacts_mod
from vmcloud.compute import load
from vmcloud.compute import phases
from vmcloud.compute import readiness
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.dispatcher import states
from vmcloud.drivers import base as driver_base
from vmcloud.mirror import api as mirror_api
from vmcloud.mirror import peer_http
from vmcloud.mirror import peers as peers_mod
from vmcloud.nbd import statelock
from vmcloud.network import agent as network_agent_mod
from vmcloud.storage import durable
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

NODE_ID_FILE = 'node-id'
_NODE_ID = re.compile(r'[0-9a-f]{32}')

RESTARTED_DURING_BUILD = 'compute manager restarted during the build'
# The states of instances a restarted manager keeps (with their guests and ports).
KEPT = (states.ACTIVE, states.UNKNOWN, states.ERROR)
# Part of a freeze call's timeout kept for its answer to travel back: an answer sent
# at the very deadline reaches a caller that has just given up.
_REPLY_SHARE = 0.1
# Seconds stop() waits for the heartbeat thread to end.
_HEARTBEAT_JOIN = 10.0
# Snapshots whose pause limit passed are remembered (to answer their late barrier
# with why) up to this many.
_EXPIRED_KEPT = 256

# A guest of a snapshot's freeze: syncing its disk, freezing, frozen, or given up while
# syncing or freezing (the freeze call answered an error): thawed once its freeze ends.
SYNCING, FREEZING, FROZEN, ABANDONED = 'syncing', 'freezing', 'frozen', 'abandoned'


def node_id(directory: str) -> str:
    """This node's id, made once and kept in ``directory/node-id``: the dispatcher tells
    a restart of this node (same id) from another node claiming its host name.

    :raises: ConfigError naming the file if it cannot be read, made, or is malformed.
    """
    path = os.path.join(directory, NODE_ID_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        try:
            # Created whole or not at all: two managers starting at once agree on one id.
            durable.atomic_create(path, uuid.uuid4().hex.encode())
        except FileExistsError:
            pass
        with open(path) as f:
            found = f.read().strip()
    except OSError as exc:
        raise exception.ConfigError(f'cannot keep the node id in {path}: {exc}') from exc
    if not _NODE_ID.fullmatch(found):
        raise exception.ConfigError(
            f'the node id file {path} holds {found[:40]!r}, not 32 hex digits: remove it '
            'only if no other node of the cloud is this one')
    return found


@dataclasses.dataclass
class _Guest:
    state: str
    frozen_at: float = 0.0  # time.time() as its pause began, the dispatcher compares hosts
    paused_since: float = 0.0  # time.monotonic() of the same moment, for pause_ms


@dataclasses.dataclass
class _Freeze:
    """The guests one snapshot froze on this node, and the timer that thaws them."""
    pause_limit: float
    guests: dict[str, _Guest] = dataclasses.field(default_factory=dict)
    timer: threading.Timer | None = None
    expires_at: float = 0.0  # time.monotonic() as the timer fires


class ComputeManager:
    """One node. Several can live in one process (all-in-one), each with its own ``host``."""

    def __init__(self, conf: cfg.ConfigOpts, mirrors: mirror_api.Mirrors,
                 host: str | None = None, driver: driver_base.Driver | None = None,
                 warehouse: warehouse_mod.Warehouse | None = None,
                 node_root: str | None = None, shared_driver: bool = False,
                 network_agent: network_agent_mod.NetworkAgent | None = None):
        """``mirrors`` serve the node's disks; whoever made them closes them (after stop()).

        ``node_root`` holds the node's id (default: ``state_path``): the all-in-one mode
        runs several nodes on one ``state_path``. ``shared_driver``: the driver also lists
        other nodes' guests (the all-in-one's nodes share ``instances_path``), so the node
        counts as its own only the guests it has a mirror for (or the dispatcher placed
        here), and leaves instance directories to the driver. ``network_agent`` builds the
        guests' networks on this machine (default: the one ``[network] agent`` names, of
        its own); the all-in-one's nodes share one, so that their guests share each
        network's bridge.
        """
        self.conf = conf
        self.host = host or conf.host
        self.warehouse = warehouse or warehouse_mod.Warehouse(conf)
        self.driver = driver or driver_base.load(conf)
        self.mirrors = mirrors
        self.shared_driver = shared_driver
        self.network_agent = (network_agent if network_agent is not None
                              else network_mod.load_agent(conf, [self.driver]))
        self._node_dir = node_root or conf.state_path
        self.node_id = node_id(self._node_dir)
        self._state_lock: statelock.StateLock | None = None
        self.incarnation = str(uuid.uuid4())
        # One copy per machine, even with several nodes in one process.
        self.artifacts = artifacts_mod.BootArtifacts(
            conf.compute.boot_artifacts_path, self.warehouse, conf.compute.boot_timeout)
        self.dispatcher = dispatcher_rpcapi.DispatcherAPI(conf, retry=-1)
        # Made here, so a load_cgroup that cannot be read stops the manager at once; each
        # heartbeat then reports the load since the one before.
        self.cpu_sampler = load.sampler(conf)
        self._lock = threading.Lock()
        self._freezes: dict[str, _Freeze] = {}
        self._expired: collections.OrderedDict[str, float] = collections.OrderedDict()
        # Snapshots a barrier or thaw ended here: a freeze of one that comes after (late
        # on the bus) is refused, or its guests would stay paused for nothing.
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        # instance id -> the newest build attempt started here
        self._attempts: dict[str, int] = {}
        self._stopping = threading.Event()
        self._server = rpc.server(conf, compute_rpcapi.TOPIC, self.host, [self])
        self._serving = False  # an RPC server never started cannot be stopped: it hangs
        self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                           name=f'heartbeat-{self.host}')
        # The URL of the node's peer chunk server as registered ('': the node takes no
        # part in the peer exchange).
        self.peer_url = ''
        self._peers_lock = threading.Lock()
        # The boot artifacts' way to the peers (None: the node takes no part). Their
        # own: the mirrors' exchange is in the node's mirror service, whose control
        # requests read no chunk for a caller.
        self._artifact_peers: peers_mod.PeerExchange | None = None
        self._artifact_client: peer_http.PeerClient | None = None

    def start(self) -> 'ComputeManager':
        """Register, adopt what the node runs, then serve and report.

        :raises: StateLocked naming the other manager of this host on this node;
            HostNameInUse naming the node that holds the host name; MessagingError
            if the dispatcher does not answer within [DEFAULT] rpc_startup_timeout;
            MirrorServiceUnavailable.
        """
        # Two managers of one host on one node would share its node id, so the
        # dispatcher could not tell them apart: the second is refused here.
        self._state_lock = statelock.StateLock(
            f'compute manager {self.host}',
            os.path.join(self._node_dir, f'compute-{self.host}.lock'))
        try:
            self._adopt(self._register())
        except BaseException:
            self._release_state()
            raise
        # Served only now: a build or destroy queued for this host must not race adoption.
        self._server.start()
        self._serving = True
        self._heartbeat.start()
        LOG.info('compute manager %s started (node %s, incarnation %s)', self.host,
                 self.node_id, self.incarnation)
        return self

    def stop(self, destroy_instances: bool = False) -> None:
        """Stop serving and reporting. Guests and mirrors keep running for the next
        manager to adopt, unless ``destroy_instances``; guests frozen for a snapshot are
        thawed either way."""
        self._stopping.set()
        if self._serving:
            self._server.stop()
            self._server.wait()
        if self._heartbeat.is_alive():
            # Bounded: a heartbeat blocked on a bus that is away must not hold the stop.
            self._heartbeat.join(_HEARTBEAT_JOIN)
        if self._artifact_client is not None:
            self._artifact_client.close()
        with self._lock:
            frozen = list(self._freezes)
        for snapshot_id in frozen:
            self.thaw({}, snapshot_id)
        if destroy_instances:
            for name in sorted(set(self._guests()) | set(self.mirrors.names())):
                self._destroy_logged(name)
        self._release_state()

    def _release_state(self) -> None:
        if self._state_lock is not None:
            self._state_lock.release()
            self._state_lock = None

    # -- registering and adopting ----------------------------------------------------

    def _register(self) -> list[dict]:
        """:returns: the instances the dispatcher has on this host (register_host).
        :raises: HostNameInUse; MessagingError if the dispatcher does not answer within
            [DEFAULT] rpc_startup_timeout; InvalidRequest naming a bad VTEP address or
            peer URL; the MirrorError of a mirror service that cannot tell its peer URL
            (see _mirrors_peer_url); ConfigError for a [mirror] peer_token that cannot
            travel in an HTTP header."""
        self.peer_url = self._mirrors_peer_url()
        if self.peer_url:
            self._fetch_artifacts_from_peers()
        return rpc.call_until_answered(
            lambda: self.dispatcher.register_host(
                self.host, self.node_id, self.incarnation, self.capacity(),
                vtep_address=self.conf.network.vtep_address,
                peer_url=self.peer_url)['instances'],
            f'compute host {self.host}', self.conf.rpc_startup_timeout, self._stopping)

    def _mirrors_peer_url(self) -> str:
        """Where the other nodes reach this node's mirrors for chunks; '' if they run
        no peer exchange, or a mirror service of before that has no such request.

        :raises: any other MirrorError of the mirrors (MirrorServiceUnavailable: the
            service is away or too slow), as every other call of the start does: a node
            that would silently leave the exchange over a service restarting is none.
        """
        try:
            return self.mirrors.peer_url()
        except exception.MirrorRequestInvalid as exc:
            # A node out of the exchange still runs guests: its mirrors read from the
            # warehouse, as they did before peers.
            LOG.warning('compute host %s takes no part in the peer exchange: its mirrors '
                        'cannot tell their peer URL: %s', self.host, exc)
            return ''

    def _fetch_artifacts_from_peers(self) -> None:
        """Have the boot artifacts fetched through a peer exchange of their own, which
        learns the peer set with the mirrors (refresh_peers): many nodes booting one
        kernel ask its chunks' owners, whose caches read the warehouse once, rather than
        each reading the warehouse. [mirror] is the node's mirror service's
        configuration too, so this exchange names the owners the mirrors do.

        :raises: ConfigError if [mirror] peer_token cannot travel in an HTTP header.
        """
        options = self.conf.mirror
        self._artifact_client = peer_http.PeerClient(options.peer_token, options.peer_timeout)
        self._artifact_peers = peers_mod.PeerExchange(
            self._read_through_node, self._artifact_client, options.peer_replicas,
            options.peer_skip_time)
        self.artifacts.read_chunks_with(self._artifact_peers.fetch)

    def _read_through_node(self, chunk_id: str) -> bytes:
        """A chunk the artifacts' exchange reads from the repository (this node is its
        primary owner, or no owner served it), read through this node's own cache (its
        peer server) instead: kept there, it is there for the other nodes that ask this
        one, and the warehouse is read once, not once for this process and once more for
        the cache. The node's server refusing or failing, the warehouse is read here.

        :raises: ChunkNotFound; what the warehouse's read_chunk raises.
        """
        try:
            data = self._artifact_client.get(self.peer_url, chunk_id)
        except exception.ChunkNotFound:
            raise  # the repository lacks it: the warehouse would say the same
        except exception.VmcloudError as exc:
            LOG.info('boot artifact chunk %s not had through the mirrors of %s, reading the '
                     'warehouse: %s', chunk_id, self.host, exc)
            return self.warehouse.read_chunk(chunk_id)
        if manifest_mod.chunk_id(data) != chunk_id:
            LOG.warning('the mirrors of %s served corrupt bytes for boot artifact chunk %s: '
                        'reading the warehouse', self.host, chunk_id)
            return self.warehouse.read_chunk(chunk_id)
        return data

    def _adopt(self, wanted: list[dict]) -> None:
        """Decide the fate of every guest and mirror found here, one log line each:
        what the dispatcher wants running here is kept (and resumed if a snapshot left it
        paused); a build caught by the restart is undone and reported failed, and so is
        one of which nothing is here (its request died with the previous manager, which
        had taken it off the bus: a request still queued for it is stale once the
        dispatcher retried); the rest is destroyed with its mirror, instance directory and
        port. Then the network agent keeps the ports of what is kept (the 'network' of each
        wanted instance) and puts right what it finds of the networks."""
        by_name = {instance['name']: instance for instance in wanted}
        mirrors = set(self.mirrors.names())
        guests = set(self._guests(also=by_name))
        building = {name for name, instance in by_name.items()
                    if instance['state'] == states.BUILDING}
        for name in sorted(guests | mirrors | building):
            instance = by_name.get(name)
            state = instance['state'] if instance else None
            found = ' and '.join(what for what, there in (('guest', name in guests),
                                                          ('mirror', name in mirrors)) if there)
            if state in KEPT:
                LOG.info('adopting %s (%s): keeping its %s', name, state, found)
                if name in guests:
                    self._keep(name)
            elif state == states.BUILDING:
                if found:
                    LOG.info('adopting %s: its build was cut by the restart: destroying its '
                             '%s and reporting the build failed', name, found)
                else:
                    LOG.info('adopting %s: building here but nothing of it is (its request '
                             'died with the previous manager): reporting the build failed',
                             name)
                self._destroy_logged(name)
                with self._lock:
                    # Reported failed: that attempt's request, if the bus delivers it
                    # (again) before the dispatcher reads the report, is stale.
                    self._attempts[instance['id']] = instance['attempts']
                self._report(self.dispatcher.build_failed, instance['id'], self.host,
                             RESTARTED_DURING_BUILD)
            elif state == states.DELETING:
                LOG.info('adopting %s: deleting: destroying its %s', name, found)
                if self._destroy_logged(name):
                    self._report(self.dispatcher.instance_destroyed, self.host, name)
            else:
                LOG.info('adopting %s: not wanted on %s: destroying its %s', name, self.host,
                         found)
                self._destroy_logged(name)
        if not self.shared_driver:
            self._remove_stray_directories(set(by_name) | set(self._guests()))
        self._reconcile_networks(by_name)

    def _reconcile_networks(self, by_name: dict[str, dict]) -> None:
        wanted: dict[str, set[str]] = {}
        peers: dict[str, list[str]] = {}
        for name, instance in by_name.items():
            network = instance.get('network')
            if instance['state'] in KEPT and network:
                wanted.setdefault(network['id'], set()).add(name)
                peers[network['id']] = list(instance.get('peers') or ())
        if self.shared_driver:
            # The all-in-one's agent also holds the other nodes' ports, and those are not
            # this node's to decide: every port of a guest the dispatcher does not place
            # here stays (this node's unwanted guests were unplugged as they went).
            try:
                records = self.network_agent.networks()
            except exception.VmcloudError as exc:
                LOG.error('adopting: cannot read the guest networks of %s: %s', self.host,
                          exc)
                return
            for network_id, record in records.items():
                wanted.setdefault(network_id, set()).update(
                    set(record.get('ports', {})) - set(by_name))
        try:
            self.network_agent.reconcile(wanted, owner=self.host)
            # The peers as the dispatcher knows them now: a set_network_peers cast sent
            # while this manager was away was lost with it.
            for network_id, network_peers in sorted(peers.items()):
                self.network_agent.set_peers(network_id, network_peers)
        except exception.VmcloudError as exc:
            # The guests kept run on: a network left wrong is named, not a refused start.
            LOG.error('adopting: cannot put the guest networks of %s right: %s', self.host,
                      exc)

    def _keep(self, name: str) -> None:
        try:
            if self.driver.power_state(name) == driver_base.PowerState.PAUSED:
                # Its manager died between freeze and thaw: nothing will thaw it now.
                LOG.info('resuming %s, left paused by the previous manager', name)
                error = self._resume(name)
                if error:
                    LOG.error('cannot resume %s: %s', name, error)
        except exception.VmcloudError as exc:
            LOG.error('cannot look at %s while adopting it: %s', name, exc)
            return
        # It was ready once (built): its boot is over.
        phases.follow(self.driver, self.mirrors, name)

    def _remove_stray_directories(self, keep: set[str]) -> None:
        """Instance directories the driver does not list (a spawn cut short) nor the
        dispatcher wants: nothing will ever use them."""
        path = self.conf.compute.instances_path
        try:
            found = os.listdir(path)
        except FileNotFoundError:
            return
        for leaf in sorted(set(found) - keep):
            directory = os.path.join(path, leaf)
            if os.path.isdir(directory) and not os.path.islink(directory):
                LOG.info('adopting: removing the stray instance directory %s', directory)
                shutil.rmtree(directory, ignore_errors=True)

    def _guests(self, also: Iterable[str] = ()) -> list[str]:
        """The guests of this node the driver lists; with a shared driver, those it has
        a mirror for or in ``also``."""
        listed = self.driver.list_instances()
        if not self.shared_driver:
            return listed
        mine = set(self.mirrors.names()) | set(also)
        return [name for name in listed if name in mine]

    def _running(self) -> list[str]:
        """The guests of this node that run (paused counts: it runs again on thaw)."""
        running = []
        for name in self._guests():
            try:
                if self.driver.power_state(name) != driver_base.PowerState.SHUTDOWN:
                    running.append(name)
            except exception.InstanceNotFound:
                pass  # destroyed meanwhile
            except exception.VmcloudError as exc:
                # Counted: raised, it would stop the whole heartbeat and have every guest
                # of the node taken for unknown; left out, this one would end in error.
                LOG.warning('cannot tell whether %s runs, counting it as running: %s',
                            name, exc)
                running.append(name)
        return running

    # -- heartbeat ---------------------------------------------------------------

    def capacity(self) -> dict:
        """What the node offers and how busy it is since the last call, for the
        dispatcher: 'vcpus', 'memory_mib', 'disk_bytes_free', 'cpus', 'cpu_busy',
        'fetched_bytes' (from the warehouse), 'cache_bytes' (the bytes its chunk cache
        holds) and, on a node of the peer exchange, 'peer_bytes' (had from other
        nodes' mirrors) (each of the last four left out if it cannot be measured now).

        :raises: what the driver's host_capacity raises.
        """
        measured = self.driver.host_capacity()
        capacity = {'vcpus': measured.cpus, 'memory_mib': measured.memory_mib,
                    'disk_bytes_free': measured.free_disk_bytes,
                    'cpus': self.cpu_sampler.cpus}
        try:
            capacity['cpu_busy'] = self.cpu_sampler.busy()
        except exception.ConfigError as exc:
            # Only a figure, as fetched_bytes: a cgroup removed under the node must not
            # have the node and its guests taken for unknown.
            LOG.warning('heartbeat of %s without its CPU load: %s', self.host, exc)
        for figure, read in (('fetched_bytes', self.mirrors.fetched_bytes),
                             ('cache_bytes', self.mirrors.cached_bytes)):
            try:
                capacity[figure] = read()
            except exception.MirrorError as exc:
                # Only a figure: without the heartbeat, a mirror service restarting (or
                # one of before, which cannot tell it) would have the node and every
                # guest of it taken for unknown.
                LOG.warning('heartbeat of %s without its %s: %s', self.host,
                            figure.replace('_', ' '), exc)
        if self.peer_url:
            try:
                capacity['peer_bytes'] = self.mirrors.peer_stats().get('peer_bytes', 0)
            except exception.MirrorError as exc:
                LOG.warning('heartbeat of %s without its peer bytes: %s', self.host, exc)
        return capacity

    def refresh_peers(self) -> dict[str, str] | None:
        """Hand the node's mirrors, and the exchange its boot artifacts are fetched
        through, the peer set the dispatcher knows now (chunk_peers), as every heartbeat
        does; the all-in-one calls it once all its nodes are up.

        :returns: the set handed over; None if the node takes no part in the peer
            exchange, or if the set could not be had or handed over: the mirrors keep
            the last one (a peer gone meanwhile they skip by themselves). Raises no
            VmcloudError.
        """
        if not self.peer_url:
            return None
        # One refresh at a time: an older answer must not replace a newer one.
        with self._peers_lock:
            try:
                # Within a heartbeat interval: a dispatcher slow to answer must not hold
                # the next heartbeat back until the node is taken for silent.
                peers = self.dispatcher.chunk_peers(timeout=self.conf.heartbeat_interval)
            except exception.VmcloudError as exc:
                LOG.warning('peers of %s not refreshed, the last known set stays: cannot '
                            'ask the dispatcher: %s', self.host, exc)
                return None
            try:
                self.mirrors.set_peers(self.host, peers)
            except exception.MirrorError as exc:
                LOG.warning('peers of %s not refreshed, the last known set stays: its '
                            'mirrors refused the set: %s', self.host, exc)
                return None
            if self._artifact_peers is not None:
                try:
                    self._artifact_peers.update(self.host, peers)
                except exception.MirrorError as exc:
                    # The mirrors took the set, so this one takes it too as a rule.
                    LOG.warning('peers of %s not refreshed for its boot artifacts, the '
                                'last known set stays: %s', self.host, exc)
                    return None
            return peers

    def _beat(self) -> None:
        while not self._stopping.is_set():
            try:
                self.dispatcher.report_heartbeat(self.host, self.capacity(), self.incarnation,
                                                 self._running())
            except (exception.VmcloudError, OSError) as exc:
                LOG.warning('heartbeat of %s not sent: %s', self.host, exc)
            except Exception:  # a dead thread would have this node marked unknown
                LOG.exception('heartbeat of %s not sent', self.host)
            try:
                self.refresh_peers()
            except Exception:  # a bug: the heartbeats must go on all the same
                LOG.exception('peers of %s not refreshed', self.host)
            self._stopping.wait(self.conf.heartbeat_interval)

    # -- building ----------------------------------------------------------------

    def _current(self, instance: dict) -> bool:
        """Whether a build request is still wanted: the dispatcher says so, and no later
        (or the same) attempt of the instance was started here."""
        instance_id, attempt = instance['id'], instance['attempt']
        with self._lock:
            started = self._attempts.get(instance_id)
        if started is not None and attempt <= started:
            LOG.info('dropping the build of %s attempt %d: attempt %d was started here',
                     instance['name'], attempt, started)
            return False
        try:
            wanted = self.dispatcher.build_wanted(instance_id, self.host, attempt)
        except exception.VmcloudError as exc:
            # Not built: the dispatcher's build deadline ends and retries it, whereas a
            # guest built unasked would be a duplicate.
            LOG.error('dropping the build of %s attempt %d: cannot ask the dispatcher '
                      'whether it is still wanted: %s', instance['name'], attempt, exc)
            return False
        if not wanted:
            LOG.info('dropping the stale build of %s attempt %d: moved, deleted or retried '
                     'since', instance['name'], attempt)
            return False
        with self._lock:
            if attempt <= self._attempts.get(instance_id, -1):
                return False  # the same request twice, at once
            self._attempts[instance_id] = attempt
        return True

    @rpc.expose
    def build_instance(self, ctxt: dict, instance: dict) -> None:
        """Build on a mirror, on the instance's network if the request names one; report
        instance_built once it passed its readiness check, or build_failed, always one of
        them, unless the request is stale (see ``_current``): then nothing is done.

        Plug its port, boot it with a NIC on the network's bridge, wait for its health
        check (``readiness``), then report; a failure at any step undoes every step of it
        (guest, mirror, port)."""
        if not self._current(instance):
            return
        name = instance['name']
        started = time.monotonic()
        try:
            network = instance.get('network')
            if network and not self.driver.has(driver_base.Capability.BRIDGED_NIC):
                # Refused before anything is made: a guest without its network is no use.
                raise exception.NotSupported(
                    self.driver.name, f'attach a guest to a network (network {network["id"]} '
                                      'was asked for)')
            health = readiness.check(instance.get('health'))
            boot = instance.get('boot') or {}
            # Before the mirror: an artifact that cannot be had fails the build cheaply.
            files = {what: self.artifacts.path_of(boot[what])
                     for what in artifacts_mod.ARTIFACTS if boot.get(what)}
            nics, address = (), None
            if network:
                port = instance['port']
                bridge = self.network_agent.plug(network, instance['dhcp_port'],
                                                 list(instance.get('peers') or ()), name, port,
                                                 owner=self.host)
                nics = (driver_base.Nic(mac=port['mac'], bridge=bridge),)
                address = port['address']
            mirror = self.mirrors.create(name, instance['image'])
            spec = driver_base.InstanceSpec(
                name=name, disk=mirror.uri, disk_format='raw',
                memory_mib=instance['memory_mib'], vcpus=instance['vcpus'],
                kernel=files.get('kernel'), initrd=files.get('initrd'),
                cmdline=boot.get('cmdline', '').replace('{name}', name), nics=nics)
            self.driver.spawn(spec)
            ready = readiness.wait_ready(
                self.driver, self.network_agent if network else None, name, health,
                network['id'] if network else None, address,
                health.get('timeout') or self.conf.compute.boot_timeout)
            phases.follow(self.driver, self.mirrors, name)
            needed = self.mirrors.needed_bytes(name)
        except Exception as exc:  # every failure goes back to the dispatcher, named
            LOG.warning('building %s on %s failed: %s', name, self.host, exc)
            reason = f'{type(exc).__name__}: {exc}'
            try:
                self._destroy(name)
            except Exception as cleanup:  # the dispatcher must hear of the failure anyway
                LOG.exception('cleaning up %s after its failed build', name)
                reason += f'; cleanup failed: {type(cleanup).__name__}: {cleanup}'
            self._report(self.dispatcher.build_failed, instance['id'], self.host, reason)
            return
        took = time.monotonic() - started
        LOG.info('%s built on %s in %.1f s (%s check passed after %.1f s)', name, self.host,
                 took, readiness.describe(health), ready)
        self._report(self.dispatcher.instance_built, instance['id'], self.host, took, needed)

    def _report(self, method, *args) -> None:
        try:
            method(*args)
        except exception.VmcloudError as exc:
            LOG.error('cannot report to the dispatcher: %s', exc)

    @rpc.expose
    def destroy_instance(self, ctxt: dict, name: str) -> None:
        """Destroy the guest, its mirror and its directory, then confirm it to the
        dispatcher (also when nothing was left of it)."""
        self._destroy(name)
        self._report(self.dispatcher.instance_destroyed, self.host, name)

    def _destroy(self, name: str) -> None:
        """Guest, port, mirror and directory: whatever is left of each."""
        if name in self._guests():
            # The shutdown boundary of an image that prints no marker of its own.
            phases.stopping(self.mirrors, name)
            try:
                self.driver.destroy(name)
            except exception.InstanceNotFound:
                pass  # gone meanwhile
        # After the guest: its tap, in the bridge, goes with it (the driver's), then the
        # network may go with its last port. A port the agent cannot let go of (it stays
        # for reconcile) keeps neither the disk nor the directory.
        try:
            self._unplug(name)
        finally:
            try:
                self.mirrors.remove(name)
            except exception.MirrorNotFound:
                pass
            if not self.shared_driver:
                shutil.rmtree(os.path.join(self.conf.compute.instances_path, name),
                              ignore_errors=True)

    def _unplug(self, name: str) -> None:
        """Forget ``name``'s port in whichever network of this machine has it (the destroy
        request names no network; unplugging from one without it does nothing).

        :raises: NetworkError naming the command that failed.
        """
        for network_id in self.network_agent.networks():
            self.network_agent.unplug(network_id, name, owner=self.host)

    @rpc.expose
    def set_network_peers(self, ctxt: dict, network_id: str, peers: list[str]) -> None:
        """The other hosts running guests of the network changed: ``peers`` are their
        VTEP addresses, all of them (a network not on this host: nothing to do)."""
        try:
            self.network_agent.set_peers(network_id, list(peers))
        except exception.VmcloudError as exc:
            # A cast: nobody waits for the answer, so the error is logged here.
            LOG.error('cannot set the peers of network %s on %s to %s: %s', network_id,
                      self.host, ', '.join(peers) or 'none', exc)

    def _destroy_logged(self, name: str) -> bool:
        """_destroy, an error logged: the other guests must still go. :returns: whether
        it worked."""
        try:
            self._destroy(name)
            return True
        except exception.VmcloudError as exc:
            LOG.error('cannot destroy %s: %s', name, exc)
        except Exception:
            LOG.exception('cannot destroy %s', name)
        return False

    # -- console -----------------------------------------------------------------

    @rpc.expose
    def console_log(self, ctxt: dict, name: str, max_bytes: int) -> str:
        """The last ``max_bytes`` bytes (at most) of what guest ``name`` printed.

        :raises: InstanceNotFound; InvalidRequest if ``max_bytes`` is below 1.
        """
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise exception.InvalidRequest(f'max_bytes must be at least 1, not {max_bytes!r}')
        if name not in self._guests():
            raise exception.InstanceNotFound(name)
        data = self.driver.console_log(name).encode('utf-8', 'replace')
        # A character cut at the start of the tail is dropped, not shown as garbage.
        return data[-max_bytes:].decode('utf-8', 'ignore')

    # -- snapshots ---------------------------------------------------------------

    @rpc.expose
    def freeze(self, ctxt: dict, snapshot_id: str, names: list[str], pause_limit: float,
               freeze_timeout: float) -> dict:
        """Sync each guest's disk while it runs, then pause them all at once.

        Answers within ``freeze_timeout`` s: a guest still syncing or freezing then is an
        error (and thawed as soon as its freeze ends). Every guest frozen here thaws by
        itself ``pause_limit`` s after the freeze began, unless barrier_and_thaw or thaw
        came first.

        :returns: {name: {'frozen_at': epoch seconds as its pause began} | {'error': str}}.
        """
        if not self.driver.has(driver_base.Capability.SNAPSHOT_BARRIER):
            # Refused before any guest is touched: none of them waits for a thaw.
            refusal = f'the {self.conf.compute.driver} driver has no snapshot barrier'
            return {name: {'error': refusal} for name in names}
        deadline = time.monotonic() + freeze_timeout * (1 - _REPLY_SHARE)
        answers: dict[str, dict] = {}
        # Before the freeze is recorded: raised later, it would leave the guests taken
        # by a freeze that no pause limit ends.
        mine = set(self._guests())
        with self._lock:
            gone = self._gone(snapshot_id)
            if gone:
                return {name: {'error': gone} for name in names}
            record = self._freezes.setdefault(snapshot_id, _Freeze(float(pause_limit)))
            busy = {name: other for other, each in self._freezes.items()
                    for name in each.guests}
            todo = []
            for name in dict.fromkeys(names):
                if name in busy:
                    answers[name] = {'error': f'{name} is already frozen for snapshot '
                                              f'{busy[name]}'}
                else:
                    record.guests[name] = _Guest(SYNCING)
                    todo.append(name)
        if self.conf.compute.sync_before_freeze:
            todo = self._settle(snapshot_id, record, todo, answers, deadline,
                                lambda name: self._sync(name, mine), 'sync of the disk of')
        with self._lock:
            if record.timer is None and todo:
                record.expires_at = time.monotonic() + record.pause_limit
                record.timer = threading.Timer(record.pause_limit, self._expire,
                                               [snapshot_id])
                record.timer.daemon = True
                record.timer.start()
        frozen = self._settle(snapshot_id, record, todo, answers, deadline,
                              lambda name: self._freeze_one(record, name, mine), 'freeze of')
        with self._lock:
            for name in frozen:
                # Its pause limit may have passed since (a limit below the freeze's time),
                # or a thaw came.
                gone = self._gone(snapshot_id)
                answers[name] = {'error': gone} if gone else {
                    'frozen_at': record.guests[name].frozen_at}
            if not record.guests and self._freezes.get(snapshot_id) is record:
                del self._freezes[snapshot_id]
                if record.timer is not None:
                    record.timer.cancel()
        LOG.info('snapshot %s: froze %d of %d guests on %s', snapshot_id, len(frozen),
                 len(names), self.host)
        return {name: answers[name] for name in names}

    def _settle(self, snapshot_id: str, record: _Freeze, names: list[str],
                answers: dict[str, dict], deadline: float, work: Callable[[str], None],
                what: str) -> list[str]:
        """Run ``work`` on each guest at once until ``deadline``; a guest whose work
        failed or is still running then gets its error in ``answers`` and leaves the
        freeze (a late one is abandoned: see _freeze_one).

        :returns: the names whose work succeeded, in order.
        """
        futures = _each_within(work, names, deadline)
        done = []
        with self._lock:
            for name in names:
                future = futures[name]
                guest = record.guests.get(name)
                if not future.done():
                    answers[name] = {'error': f'the {what} {name} did not end within the '
                                              'freeze timeout'}
                    if guest is not None:
                        guest.state = ABANDONED
                    record.guests.pop(name, None)
                elif future.exception() is not None:
                    answers[name] = {'error': _why(future.exception())}
                    record.guests.pop(name, None)
                elif guest is None or guest.state == ABANDONED:
                    # Expired or ended meanwhile: its pause limit or a thaw thawed it, or will.
                    answers[name] = {'error': self._gone(snapshot_id) or self._expiry(
                        snapshot_id)}
                else:
                    done.append(name)
        return done

    def _sync(self, name: str, mine: set[str]) -> None:
        if name not in mine:
            raise exception.InstanceNotFound(name)
        self.mirrors.sync(name)

    def _freeze_one(self, record: _Freeze, name: str, mine: set[str]) -> None:
        """:raises: InstanceNotFound, DriverError (the guest is resumed first)."""
        if name not in mine:
            raise exception.InstanceNotFound(name)
        with self._lock:
            guest = record.guests.get(name)
            if guest is None or guest.state == ABANDONED:
                return  # given up while its disk synced
            # The guest's vCPUs stop when the freeze starts; draining its I/O comes after.
            guest.state, guest.frozen_at, guest.paused_since = (
                FREEZING, time.time(), time.monotonic())
        try:
            self.driver.freeze_io(name)
        except Exception:  # any: no pause limit would thaw a guest the freeze has left
            # A freeze that failed half way may have paused it.
            self._resume(name)
            raise
        with self._lock:
            late = guest.state == ABANDONED
            if not late:
                guest.state = FROZEN
        if late:
            LOG.warning('the freeze of %s ended after it was given up: thawing it', name)
            self._resume(name)
        else:
            LOG.info('%s frozen in %.1f ms', name, (time.monotonic() - guest.paused_since) * 1000)

    def _expiry(self, snapshot_id: str) -> str:
        return (f'freeze expired: no barrier came within the pause limit of '
                f'{self._expired.get(snapshot_id, 0):g} s, so the guest was thawed on '
                f'{self.host}')

    def _gone(self, snapshot_id: str) -> str:
        """Why the snapshot can freeze nothing more here, or ''. Called locked."""
        if snapshot_id in self._expired:
            return self._expiry(snapshot_id)
        if snapshot_id in self._ended:
            return (f'snapshot {snapshot_id} was already thawed or barriered on {self.host}: '
                    'this freeze came too late')
        return ''

    @staticmethod
    def _remember(table: collections.OrderedDict, snapshot_id: str, value) -> None:
        table[snapshot_id] = value
        while len(table) > _EXPIRED_KEPT:
            table.popitem(last=False)

    def _claim(self, snapshot_id: str,
               expire: bool = False) -> tuple[dict[str, _Guest], bool, float]:
        """Take the snapshot's guests out of its pause limit's reach (``expire``: as its
        pause limit passes), the others given up; the snapshot is over here.

        :returns: its frozen guests, whether its pause limit had passed already, and when
            it would have passed (time.monotonic()).
        """
        with self._lock:
            if not expire and snapshot_id not in self._expired:
                self._remember(self._ended, snapshot_id, None)
            record = self._freezes.pop(snapshot_id, None)
            if record is None:
                return {}, snapshot_id in self._expired, 0.0
            if expire:
                self._remember(self._expired, snapshot_id, record.pause_limit)
            elif record.timer is not None:
                record.timer.cancel()
            frozen = {}
            for name, guest in record.guests.items():
                if guest.state == FROZEN:
                    frozen[name] = guest
                else:
                    guest.state = ABANDONED
            return frozen, False, record.expires_at

    def _expire(self, snapshot_id: str) -> None:
        """The pause limit of a snapshot passed without a barrier: thaw its guests."""
        frozen, _, _ = self._claim(snapshot_id, expire=True)
        if snapshot_id not in self._expired:
            return  # a barrier or thaw came first
        LOG.warning('snapshot %s: no barrier within the pause limit of %g s: thawing %s',
                    snapshot_id, self._expired[snapshot_id],
                    ', '.join(sorted(frozen)) or 'nothing')
        _each(self._resume, sorted(frozen))

    def _resume(self, name: str) -> str:
        """Let a guest run again, however it was paused. :returns: '' or why it cannot."""
        try:
            self.driver.thaw_io(name)
            return ''
        except exception.VmcloudError as exc:
            error = str(exc)
        try:
            if self.driver.power_state(name) == driver_base.PowerState.PAUSED:
                self.driver.resume(name)
            return ''
        except exception.VmcloudError as exc:
            LOG.error('cannot resume %s: %s; then %s', name, error, exc)
            return f'{error}; resume: {exc}'

    @rpc.expose
    def barrier_and_thaw(self, ctxt: dict, snapshot_id: str, items: list[dict]) -> dict:
        """Take each frozen guest's barrier, thaw them all, then upload in the background.

        ``items``: [{'instance_id', 'name', 'target'}], target the image the version is
        stored under. Frozen guests of the snapshot not in ``items`` are thawed too. The
        mirrors' barriers are waited for until the pause limit at most, then the guests thaw.

        :returns: {name: {'pause_ms', 'dirty_bytes', 'thawed_at'} | {'error': str}}; a
            guest whose freeze expired (pause limit passed) answers 'freeze expired ...'.
        """
        by_name = {item['name']: item for item in items}
        frozen, expired, expires_at = self._claim(snapshot_id)
        results: dict[str, dict] = {}
        ready = []
        for name in by_name:
            if name in frozen:
                ready.append(name)
            elif expired:
                results[name] = {'error': self._expiry(snapshot_id)}
            else:
                results[name] = {'error': f'{name} is not frozen for snapshot {snapshot_id} '
                                          f'on {self.host}'}
        barriers, discard = self._barriers(snapshot_id, ready, expires_at)
        thawed = dict(zip(sorted(frozen), _each(self._thaw_one, sorted(frozen))))
        if discard:
            # Whatever the service took is let go (the guests run again first): nothing
            # will upload it.
            self._discard(snapshot_id)
        targets = {}
        for name in ready:
            taken = barriers.get(name, {'error': 'the mirrors gave no barrier for it'})
            if 'error' in taken:
                results[name] = {'error': taken['error']}
                continue
            thawed_at = thawed[name]
            results[name] = {
                'pause_ms': (thawed_at[1] - frozen[name].paused_since) * 1000,
                'dirty_bytes': taken['dirty_bytes'], 'thawed_at': thawed_at[0]}
            targets[name] = by_name[name]['target']
        if targets:
            # After every thaw: the upload competes with the guests for the CPU.
            threading.Thread(target=rpc.with_current_request(self._upload),
                             args=(snapshot_id, targets,
                                   {name: by_name[name]['instance_id'] for name in targets}),
                             daemon=True, name=f'upload-{snapshot_id[:8]}').start()
        return results

    def _barriers(self, snapshot_id: str, names: list[str],
                  deadline: float) -> tuple[dict[str, dict], bool]:
        """The mirrors' barriers of ``names``, waited for until ``deadline``
        (time.monotonic()), the guests' pause limit: the mirrors may hang, not the guests.

        :returns: {name: {'dirty_bytes'} | {'error'}}, and whether the barriers must be
            discarded (the call failed). A call still running at the deadline discards
            what it took once it ends: the guests ran again meanwhile, so it is no cut.
        """
        if not names:
            return {}, False
        guard = threading.Lock()
        call = {'ended': False, 'given_up': False}  # whichever is set first wins

        def take(key: str) -> dict[str, dict]:
            try:
                return self.mirrors.barrier(key, names)
            finally:
                with guard:
                    call['ended'] = True
                    late = call['given_up']
                if late:
                    LOG.warning('snapshot %s: the barrier ended after its pause limit: '
                                'discarding it', key)
                    self._discard(key)
        future = _each_within(take, [snapshot_id], deadline)[snapshot_id]
        with guard:
            if not call['ended']:
                call['given_up'] = True
                return {name: {'error': 'the mirrors took no barrier within the pause '
                                        f'limit on {self.host}'} for name in names}, False
        try:
            return future.result(), False
        except Exception as exc:  # any: the pause limit no longer runs, the thaw must
            if not isinstance(exc, exception.VmcloudError):
                LOG.error('snapshot %s: the barrier failed', snapshot_id, exc_info=exc)
            return {name: {'error': _why(exc)} for name in names}, True

    def _thaw_one(self, name: str) -> tuple[float, float]:
        """:returns: time.time() and time.monotonic() once it runs again (or failed to)."""
        error = self._resume(name)
        if error:
            LOG.error('cannot resume %s after its snapshot barrier: %s', name, error)
        return time.time(), time.monotonic()

    def _discard(self, snapshot_id: str) -> None:
        try:
            self.mirrors.discard(snapshot_id)
        except exception.VmcloudError as exc:
            LOG.error('cannot discard the barriers of snapshot %s: %s', snapshot_id, exc)

    def _upload(self, snapshot_id: str, targets: dict[str, str],
                instance_ids: dict[str, str]) -> None:
        """Store every barrier of the snapshot here in one session, then report each."""
        try:
            results = self.mirrors.upload(snapshot_id, targets)
        except Exception as exc:  # the session failed, so every item did: reported
            results = {name: {'error': f'{type(exc).__name__}: {exc}'} for name in targets}
        for name in targets:
            result = results.get(name) or {'error': 'the mirrors gave no upload result'}
            if 'error' in result:
                LOG.error('snapshot of %s failed: %s', name, result['error'])
            else:
                LOG.info('snapshot of %s stored as %s: %d bytes new', name,
                         result.get('version'), result.get('uploaded_bytes', 0))
            self._report(self.dispatcher.snapshot_item_done, snapshot_id, instance_ids[name],
                         result.get('version', ''), result.get('uploaded_bytes', 0),
                         result.get('error', ''), result.get('persistent', True))
        on_peers = [name for name in targets
                    if (results.get(name) or {}).get('persistent') is False]
        if on_peers:
            self._wait_persistent(snapshot_id, on_peers, instance_ids)

    def _wait_persistent(self, snapshot_id: str, names: list[str],
                         instance_ids: dict[str, str]) -> None:
        """Wait (up to [DEFAULT] snapshot_upload_timeout) for the mirrors to write the
        chunks of ``names`` they left on peers to the warehouse, then tell the
        dispatcher which are persistent. Unsaid (this manager stopped, the wait ran
        out), the dispatcher finds out when it shows the snapshot."""
        try:
            persisted = self.mirrors.wait_persistent(snapshot_id,
                                                     self.conf.snapshot_upload_timeout)
        except exception.VmcloudError as exc:
            LOG.warning('snapshot %s: cannot tell whether %s reached the warehouse: %s',
                        snapshot_id, ', '.join(names), exc)
            return
        done = [instance_ids[name] for name in names if persisted.get(name)]
        if done:
            self._report(self.dispatcher.snapshot_items_persisted, snapshot_id, done)

    @rpc.expose
    def thaw(self, ctxt: dict, snapshot_id: str) -> dict:
        """Abort a snapshot here: resume every guest frozen for it.

        :returns: {name: '' or why it cannot be resumed}.
        """
        frozen, _, _ = self._claim(snapshot_id)
        names = sorted(frozen)
        if names:
            LOG.info('snapshot %s aborted: thawing %s', snapshot_id, ', '.join(names))
        return dict(zip(names, _each(self._resume, names)))


def _why(error: BaseException) -> str:
    """An error as an answer names it: a VmcloudError says what it is, others their class."""
    return str(error) if isinstance(error, exception.VmcloudError) else (
        f'{type(error).__name__}: {error}')


def _each(work: Callable, things: list) -> list:
    """``work`` on every thing at once; :returns: the results in order."""
    if not things:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(things)) as pool:
        return list(pool.map(rpc.with_current_request(work), things))


def _each_within(work: Callable[[str], None], names: list[str],
                 deadline: float) -> dict[str, concurrent.futures.Future]:
    """Start ``work`` on every name at once, each in its own thread, and wait until all
    are done or ``deadline`` (time.monotonic()) passed: a thread still running then
    is left to finish by itself (a pool would wait for it).

    :returns: name -> its future, done or not.
    """
    futures = {}
    for name in names:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run(name=name, future=future) -> None:
            future.set_running_or_notify_cancel()
            try:
                future.set_result(work(name))
            except BaseException as exc:
                future.set_exception(exc)
        threading.Thread(target=rpc.with_current_request(run), daemon=True,
                         name=f'snapshot-{name}').start()
        futures[name] = future
    concurrent.futures.wait(futures.values(), max(0.0, deadline - time.monotonic()))
    return futures
