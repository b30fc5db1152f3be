"""The gateway manager: keeps HAProxy serving what the dispatcher's gateway state says.

HAProxy runs one static configuration (vmcloud.gateway.config) for its whole life and
is programmed only through its runtime API: a reload would reset its counters and
split the connection counting of a cloud between two workers, and would drop nothing
but still make the limits inexact. ``apply`` reconciles HAProxy with a gateway state,
diffing against what HAProxy holds now (its maps, servers, weights), so it is
idempotent, sends nothing when nothing changed, and works the same on a HAProxy this
manager started, one it adopted from a previous manager, and one the watchdog started
again after it died:

- each listener (a deployment with a listener port) holds one backend slot of its
  protocol for the deployment's life; the slot is the value of its port in HAProxy's
  port-slot map, which is on disk too, so an adopting manager reads it back;
- its instances are that slot's dynamic servers (name = instance id), weighted by
  vmcloud.gateway.load from the hosts' loads and the servers' live connections;
- an instance that leaves is disabled (no new connection) and deleted once it holds
  none: the other instances' connections are never touched;
- a listener that goes leaves the maps first (its port refuses new connections), then
  its servers go as they empty, then its slot is free for another listener.

The gateway host joins each listener's network through the network agent before the
listener's servers are added (their addresses are on it), and leaves a network once no
listener uses it.

``vmcloud gateway`` stopping leaves HAProxy running with its connections: the next
manager adopts it (``stop(haproxy=True)`` stops it too).
"""
import dataclasses
import logging
import threading

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.gateway import accounting
from vmcloud.gateway import config as config_mod
from vmcloud.gateway import haproxy as haproxy_mod
from vmcloud.gateway import load
from vmcloud.gateway import rpcapi as gateway_rpcapi
from vmcloud.network import ipam

LOG = logging.getLogger(__name__)

# Seconds between two looks of the watchdog at HAProxy: a dead HAProxy refuses every
# client, so it is noticed and started again within about this.
WATCHDOG_INTERVAL = 0.5
# Seconds stop() waits for each of the manager's threads to end.
_JOIN_TIMEOUT = 10.0
# Longest pause between two registration attempts.

# The maps a listener is in, other than the slot map, and what each holds of it.
_LISTENER_MAPS = (config_mod.MAP_CLOUD, config_mod.MAP_CLOUD_LIMIT, config_mod.MAP_APP,
                  config_mod.MAP_APP_LIMIT)


@dataclasses.dataclass
class _Live:
    """What HAProxy holds now: the maps (map -> listener port -> value) and the servers
    of every slot (backend -> server name -> server)."""
    maps: dict[str, dict[int, str]]
    servers: dict[str, dict[str, haproxy_mod.Server]]
    # (backend, server) -> the client connections it serves now ('show stat' scur)
    connections: dict[tuple[str, str], int]

    @property
    def slots(self) -> dict[int, str]:
        """listener port -> its slot."""
        return self.maps[config_mod.MAP_SLOT]


class GatewayManager:
    """One gateway host: its HAProxy, its RPC server, its poll and watchdog threads."""

    def __init__(self, conf: cfg.ConfigOpts, dispatcher_api, haproxy, network_agent):
        """``dispatcher_api``: a DispatcherAPI (register_gateway, gateway_state);
        ``haproxy``: a vmcloud.gateway.haproxy.HAProxy; ``network_agent``: the agent
        that joins this host to the listeners' networks (join, leave, joined)."""
        self.conf = conf
        self.name = conf.gateway.name
        self.dispatcher = dispatcher_api
        self.haproxy = haproxy
        self.network_agent = network_agent
        self._slots = {protocol: config_mod.slot_names(conf, protocol)
                       for protocol in config_mod.PROTOCOLS}
        self._counters = accounting.Counters(config_mod.paths(conf).counters)
        # One apply at a time: the poll thread, the watchdog and a direct caller.
        self._lock = threading.Lock()
        self._count_lock = threading.RLock()
        self._state: dict | None = None
        # network id -> the peers it was joined with; None: joined by an earlier
        # manager, with peers this one does not know (joined again at the first apply).
        self._joined: dict[str, tuple | None] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._server = None
        self._threads: list[threading.Thread] = []

    # -- running ---------------------------------------------------------------------

    def start(self) -> 'GatewayManager':
        """Adopt the HAProxy a previous manager left running, or start one; register;
        apply the state; then serve refresh/connections/stats and poll.

        :raises: HAProxyError if HAProxy cannot be started; MessagingError if the
            dispatcher does not answer within [DEFAULT] rpc_startup_timeout;
            ConfigError (bad listener port ranges).
        """
        if self.haproxy.adopt():
            LOG.info('gateway %s adopted the running HAProxy', self.name)
        else:
            self.haproxy.start()
            LOG.info('gateway %s started HAProxy', self.name)
        self._joined = {network_id: None for network_id in self._joined_networks()}
        state = self._register()
        self._apply_logged(state)
        self._server = rpc.server(self.conf, gateway_rpcapi.TOPIC, self.name, [self])
        self._server.start()
        self._threads = [
            threading.Thread(target=self._poll, daemon=True, name=f'gateway-poll-{self.name}'),
            threading.Thread(target=self._watch, daemon=True,
                             name=f'gateway-watchdog-{self.name}')]
        for thread in self._threads:
            thread.start()
        LOG.info('gateway %s serving %d listeners', self.name, len(state['listeners']))
        return self

    def stop(self, haproxy: bool = False) -> None:
        """Stop serving, polling and watching. HAProxy keeps running with its
        connections, for the next manager to adopt, unless ``haproxy``."""
        self._stopping.set()
        self._wake.set()
        if self._server is not None:
            self._server.stop()
            self._server.wait()
            self._server = None
        for thread in self._threads:
            # Bounded: a poll blocked on a dispatcher that is away must not hold the stop.
            thread.join(_JOIN_TIMEOUT)
        if haproxy:
            with self._lock:
                self.haproxy.stop()

    def _register(self) -> dict:
        """:returns: the gateway state register_gateway answers.
        :raises: MessagingError if the dispatcher does not answer within
            [DEFAULT] rpc_startup_timeout."""
        return rpc.call_until_answered(
            lambda: self.dispatcher.register_gateway(self.name, self.conf.network.vtep_address),
            f'gateway {self.name}', self.conf.rpc_startup_timeout, self._stopping)

    def _poll(self) -> None:
        """Read the state and apply it every poll_interval, or at once when woken
        (refresh); refreshes that come during one reading make one more."""
        while not self._stopping.is_set():
            self._wake.wait(self.conf.gateway.poll_interval)
            if self._stopping.is_set():
                return
            # Cleared before reading: a refresh sent after this reading began was
            # maybe not in it, so it makes another.
            self._wake.clear()
            try:
                self._poll_once()
            except Exception:  # a dead poll thread would serve a stale state for ever
                LOG.exception('gateway %s could not apply the gateway state', self.name)

    def _poll_once(self) -> None:
        try:
            state = self.dispatcher.gateway_state()
        except (exception.VmcloudError, OSError) as exc:
            LOG.warning('gateway %s could not read the gateway state: %s', self.name, exc)
            return
        self._apply_logged(state)
        try:
            # What a run counted after its last reading dies with it: read often.
            self._count()
        except exception.VmcloudError as exc:
            LOG.warning('gateway %s could not read the counters: %s', self.name, exc)

    def _watch(self) -> None:
        """Start HAProxy again if it died, and program it again with the last state."""
        while not self._stopping.wait(WATCHDOG_INTERVAL):
            try:
                self._revive()
            except Exception:  # a dead watchdog would leave a dead HAProxy dead
                LOG.exception('gateway %s: the watchdog could not check HAProxy', self.name)

    def _revive(self) -> None:
        with self._lock:
            if self._stopping.is_set() or self.haproxy.alive():
                return
            LOG.warning('gateway %s: HAProxy is gone; starting it again', self.name)
            try:
                self.haproxy.start()
            except exception.VmcloudError as exc:
                LOG.error('gateway %s could not start HAProxy again: %s', self.name, exc)
                return
            state = self._state
        if state is not None:
            self._apply_logged(state)
        # And the newest state at once, not a poll interval later.
        self._wake.set()

    def _apply_logged(self, state: dict) -> None:
        try:
            self.apply(state)
        except (exception.VmcloudError, OSError) as exc:
            LOG.error('gateway %s: %s', self.name, exc)

    def _joined_networks(self) -> list[str]:
        """The networks this host is joined to already (by a previous manager)."""
        return list(self.network_agent.joined())

    # -- RPC endpoints -----------------------------------------------------------------

    @rpc.expose
    def refresh(self, ctxt: dict) -> None:
        """Read the gateway state soon; refreshes coalesce into one reading."""
        self._wake.set()

    @rpc.expose
    def connections(self, ctxt: dict, cloud: str | None = None) -> list[dict]:
        """The client connections open now (of ``cloud`` if given), as
        vmcloud.gateway.accounting.connections records them.

        :raises: HAProxyError if HAProxy does not answer.
        """
        return self._connections(self._state_or_empty(), cloud)

    @rpc.expose
    def stats(self, ctxt: dict, cloud: str | None = None) -> dict:
        """cloud name -> its counters (vmcloud.gateway.accounting.cloud_stats), of
        ``cloud`` only if given; the cumulative ones over every HAProxy run.

        :raises: CloudNotFound if ``cloud`` is given and not in the gateway state;
            HAProxyError if HAProxy does not answer; GatewayError if the counters of
            past runs cannot be read or written.
        """
        state = self._state_or_empty()
        if cloud is not None and cloud not in state['clouds']:
            raise exception.CloudNotFound(cloud)
        with self._count_lock:
            cloud_rows = self.haproxy.show_table(config_mod.TABLE_CLOUDS)
            totals = self._count(cloud_rows)
        return accounting.cloud_stats(state, self._connections(state, cloud), cloud_rows,
                                      totals, cloud)

    def _state_or_empty(self) -> dict:
        return self._state or {'clouds': {}, 'applications': {}, 'hosts': {},
                               'listeners': []}

    def _connections(self, state: dict, cloud: str | None) -> list[dict]:
        slots = self.haproxy.map_entries(config_mod.MAP_SLOT)
        return accounting.connections(
            self.haproxy.show_table(config_mod.TABLE_CONNS, 'data.conn_cur gt 0'),
            self.haproxy.sessions(),
            {slot: self.haproxy.servers(slot) for slot in sorted(set(slots.values()))},
            state['listeners'], slots, cloud)

    def _count(self, cloud_rows: list[dict] | None = None) -> dict[str, dict[str, int]]:
        """Record this HAProxy run's cumulative counters with the past runs'; the totals.

        :raises: HAProxyError, GatewayError.
        """
        # One reading at a time (the poll thread and stats requests): a reading of an
        # HAProxy run that ended must not be recorded after its successor's.
        with self._count_lock:
            if cloud_rows is None:
                cloud_rows = self.haproxy.show_table(config_mod.TABLE_CLOUDS)
            current = accounting.run_counters(
                cloud_rows, self.haproxy.show_table(config_mod.TABLE_REJECTS))
            return self._counters.update(self.haproxy.run_id(), current)

    # -- applying a state --------------------------------------------------------------

    def apply(self, state: dict) -> None:
        """Make HAProxy and this host's networks serve ``state`` (a gateway_state).

        Listeners that fit are served even when one does not.

        :raises: BackendSlotsExhausted if a listener found no free slot of its protocol;
            NetworkError if a listener's network could not be joined (its servers are
            then not added); HAProxyError if HAProxy refused a command.
        """
        with self._lock:
            self._state = state
            problems: list[exception.VmcloudError] = []
            live = self._read()
            wanted = {listener['listener_port']: listener for listener in state['listeners']}
            # Every map, not the slot map only: an entry a failed removal left in another
            # map must not wait there for the next deployment given its port.
            for port in sorted(set().union(*live.maps.values()) - set(wanted)):
                self._unmap(live, port)
            # Before placing: a slot that has just emptied is free for a waiting listener.
            kept = {live.slots[port] for port in wanted if port in live.slots}
            for backend, servers in live.servers.items():
                if backend not in kept:
                    for name in self._retire(backend, list(servers.values())):
                        del servers[name]
            placed = self._place(live, wanted, problems)
            for port, slot in placed.items():
                # One listener's failure (its network, a command HAProxy refused)
                # leaves the others served.
                try:
                    self._join(wanted[port])
                    self._serve(live, slot, wanted[port], state['hosts'])
                    self._map(live, port, slot, wanted[port], state)
                except exception.VmcloudError as exc:
                    problems.append(exc)
            # A network is left only once no listener wants it: one whose join failed
            # this time may still carry the connections of its deployment.
            self._leave_unused({listener['network']['id'] for listener in wanted.values()})
            if problems:
                raise problems[0]

    def _read(self) -> _Live:
        maps = {name: {int(key): value for key, value in self.haproxy.map_entries(name).items()}
                for name in config_mod.MAPS}
        servers = {slot: self.haproxy.servers(slot) for protocol in config_mod.PROTOCOLS
                   for slot in self._slots[protocol]}
        return _Live(maps, servers, self._server_connections())

    def _server_connections(self) -> dict[tuple[str, str], int]:
        """(backend, server) -> its current connections (``show stat`` scur)."""
        return {(row['pxname'], row['svname']): int(row.get('scur') or 0)
                for row in self.haproxy.stat()
                if row['svname'] not in ('FRONTEND', 'BACKEND')}

    def _place(self, live: _Live, wanted: dict[int, dict],
               problems: list) -> dict[int, str]:
        """listener port -> its slot: the one the slot map gives it, or a free one of its
        protocol (in no map and without servers, draining ones included)."""
        placed = {}
        for port, listener in wanted.items():
            slot = live.slots.get(port)
            if slot in self._slots[listener['protocol']]:
                placed[port] = slot
        taken = set(placed.values()) | {backend for backend, servers in live.servers.items()
                                        if servers}
        for port in sorted(set(wanted) - set(placed)):
            protocol = wanted[port]['protocol']
            free = [slot for slot in self._slots[protocol] if slot not in taken]
            if not free:
                problems.append(exception.BackendSlotsExhausted(
                    protocol, self.conf.gateway.backend_slots))
                continue
            placed[port] = free[0]
            taken.add(free[0])
            LOG.info('gateway %s: listener %d (deployment %s) takes slot %s', self.name,
                     port, wanted[port]['deployment'], free[0])
        return placed

    def _unmap(self, live: _Live, port: int) -> None:
        """Take a listener that went out of the maps, its slot first: its port refuses
        new connections from then on."""
        LOG.info('gateway %s: listener %d goes (slot %s)', self.name, port,
                 live.slots.get(port))
        for name in (config_mod.MAP_SLOT,) + _LISTENER_MAPS:
            if port in live.maps[name]:
                self.haproxy.del_map_entry(name, port)
                del live.maps[name][port]

    def _map(self, live: _Live, port: int, slot: str, listener: dict, state: dict) -> None:
        """Put a listener's entries in the maps, the slot last: a port in the slot map
        is admitted, and must find its cloud and limits there already."""
        wanted = _map_values(listener, slot, state)
        for name in _LISTENER_MAPS + (config_mod.MAP_SLOT,):
            value = wanted.get(name)
            current = live.maps[name].get(port)
            if value is None and current is not None:
                self.haproxy.del_map_entry(name, port)
            elif value is not None and value != current:
                self.haproxy.set_map_entry(name, port, value)

    def _serve(self, live: _Live, slot: str, listener: dict, hosts: dict) -> None:
        """Make ``slot``'s servers the listener's instances, weighted by their hosts'
        loads and their connections."""
        current = live.servers[slot]
        instances = {instance['id']: instance for instance in listener['instances']}
        weights = load.weights(hosts, list(instances.values()),
                               {name: live.connections.get((slot, name), 0)
                                for name in current})
        for ident, instance in instances.items():
            server = current.get(ident)
            if server is None:
                self.haproxy.add_server(slot, ident, instance['address'], listener['port'],
                                        weights[ident], self.conf.gateway.check_interval_ms)
                continue
            if (server.address, server.port) != (instance['address'], listener['port']):
                # Rebuilt elsewhere under the same id: its connections are gone already.
                self.haproxy.command(f'set server {slot}/{ident} addr {instance["address"]} '
                                     f'port {int(listener["port"])}')
            if server.weight != weights[ident]:
                self.haproxy.set_weight(slot, ident, weights[ident])
            if not server.enabled:
                self.haproxy.enable_server(slot, ident)
        self._retire(slot, [server for name, server in current.items()
                            if name not in instances])

    def _retire(self, backend: str, servers: list[haproxy_mod.Server]) -> list[str]:
        """Servers of instances that left: no new connection, and deleted once they hold
        none. Their open connections are left alone: taking an instance out must not cut
        what it serves (a dead instance's own connections fail by themselves).

        :returns: the names of the servers deleted.
        """
        deleted: list[str] = []
        if not servers:
            return deleted
        for server in servers:
            if server.enabled:
                LOG.info('gateway %s: draining %s/%s', self.name, backend, server.name)
                self.haproxy.disable_server(backend, server.name)
        # In use and idle (pooled HTTP) connections: HAProxy deletes a server with none.
        held = self.haproxy.server_connections(backend)
        for server in servers:
            if held.get(server.name, 0):
                continue
            try:
                self.haproxy.del_server(backend, server.name)
            except exception.HAProxyError as exc:
                # A connection came in the meantime: at a later apply.
                LOG.debug('gateway %s: %s/%s not deleted yet: %s', self.name, backend,
                          server.name, exc)
                continue
            LOG.info('gateway %s: deleted %s/%s', self.name, backend, server.name)
            deleted.append(server.name)
        return deleted

    # -- networks ----------------------------------------------------------------------

    def _join(self, listener: dict) -> None:
        """Join the listener's network (again if its peers changed).

        :raises: NetworkError.
        """
        network = listener['network']
        # A gateway sharing a machine (and its VTEP) with a compute host floods to no itself.
        peers = tuple(sorted(set(listener['peers']) - {self.conf.network.vtep_address}))
        if self._joined.get(network['id']) == peers:
            return
        self.network_agent.join(dict(network), ipam.gateway_address(network['cidr']),
                                list(peers))
        self._joined[network['id']] = peers

    def _leave_unused(self, used: set[str]) -> None:
        for network_id in sorted(set(self._joined) - used):
            try:
                self.network_agent.leave(network_id)
            except exception.NetworkError as exc:
                LOG.warning('gateway %s could not leave network %s: %s', self.name,
                            network_id, exc)
                continue
            del self._joined[network_id]


def _map_values(listener: dict, slot: str, state: dict) -> dict[str, str]:
    """map -> the value of a listener's port in it (a map missing: no entry)."""
    cloud = listener['cloud']
    values = {config_mod.MAP_SLOT: slot, config_mod.MAP_CLOUD: cloud,
              config_mod.MAP_CLOUD_LIMIT: str(state['clouds'][cloud]['connection_limit'])}
    application = listener.get('application')
    if application:
        values[config_mod.MAP_APP] = application
        limit = state['applications'].get(application, {}).get('connection_limit')
        if limit is not None:
            values[config_mod.MAP_APP_LIMIT] = str(limit)
    return values
