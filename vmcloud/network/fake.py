"""A network agent that builds nothing: the guest networks of the fake and sim drivers,
and of tests, modelled in memory.

It keeps the records the Linux agent keeps (``networks()`` answers alike) and models
on the drivers given to it what the Linux agent would make: plugging a port adds the
network's bridge to each driver (``add_bridge``) and gives the port's MAC its address
(``leases``: the fake's DHCP), the last port's unplug takes both away. The probes are
answered by the fake guests (``answer``) on the network's bridge: an address that is no
running guest of that network, or a port it does not serve, is refused, as a real
probe from the DHCP namespace would be. The gateway host's join and leave are
records only (``joined()``): nothing is modelled on the drivers for them. Every call is
recorded in ``calls``.

The drivers are duck-typed (``add_bridge``, ``remove_bridge``, ``leases``, ``answer``:
see vmcloud.drivers.fake): the network layer does not import the drivers.
"""
import copy
import hashlib
import ipaddress
import os
import threading

from oslo_config import cfg

from vmcloud import exception
from vmcloud.network import agent


class FakeNetworkAgent:
    def __init__(self, conf: cfg.ConfigOpts, drivers=()):
        """``drivers``: the fake drivers whose guests are on this machine's networks
        (the all-in-one's nodes share one agent); more may be added with attach()."""
        self.conf = conf
        state_dir = os.path.realpath(
            conf.network.state_dir or os.path.join(conf.state_path, 'network'))
        # The Linux agent's namespace names, so that messages read the same.
        self.tag = hashlib.sha1(state_dir.encode()).hexdigest()[:8]
        self.drivers = list(drivers)
        #: (method, args...) of every call of the agent's interface, in order
        self.calls: list[tuple] = []
        self._records: dict[str, dict] = {}
        #: network id -> what join() was given (see NetworkAgent.joined)
        self._joined: dict[str, dict] = {}
        # Compute managers call from many threads (builds run in parallel).
        self._lock = threading.RLock()

    def attach(self, driver) -> None:
        """Model this machine's networks on ``driver`` too (its guests join them)."""
        with self._lock:
            self.drivers.append(driver)
            for record in self._records.values():
                self._model(driver, record)

    # -- names -------------------------------------------------------------

    def bridge_name(self, vni: int) -> str:
        return agent.device_name('vmcb', vni)

    def gateway_interface(self, vni: int) -> str:
        return agent.device_name('vmcg', vni)

    def namespace(self, network_id: str) -> str:
        """:raises: NetworkNotFound if the network is not on this host."""
        with self._lock:
            self.calls.append(('namespace', network_id))
            return self._namespace(self._record(network_id))

    def _namespace(self, record: dict) -> str:
        return f'vmcloud-{record["network"]["vni"]}-{self.tag}'

    def _record(self, network_id: str) -> dict:
        try:
            return self._records[network_id]
        except KeyError:
            raise exception.NetworkNotFound(network_id) from None

    # -- the interface of NetworkAgent -------------------------------------

    def plug(self, network: dict, dhcp_port: dict, peers: list[str], instance: str,
             port: dict, owner: str | None = None) -> str:
        """:returns: the bridge name. :raises: NetworkError for a VNI that names no
        device."""
        with self._lock:
            self.calls.append(('plug', copy.deepcopy(network), dict(dhcp_port), list(peers),
                               instance, dict(port)))
            bridge = self.bridge_name(network['vni'])
            record = self._records.setdefault(network['id'], {
                'network': dict(network), 'dhcp_port': dict(dhcp_port), 'peers': [],
                'ports': {}, 'owners': {}})
            record['peers'] = sorted({p for p in peers if p})
            record['ports'][instance] = dict(port)
            record['owners'][instance] = owner or self.conf.host
            for driver in self.drivers:
                self._model(driver, record)
            return bridge

    def _model(self, driver, record: dict) -> None:
        driver.add_bridge(self.bridge_name(record['network']['vni']))
        prefix = ipaddress.ip_network(record['network']['cidr']).prefixlen
        for port in record['ports'].values():
            driver.leases[port['mac'].lower()] = f'{port["address"]}/{prefix}'

    def unplug(self, network_id: str, instance: str, owner: str | None = None) -> None:
        with self._lock:
            self.calls.append(('unplug', network_id, instance))
            record = self._records.get(network_id)
            if record is None or instance not in record['ports']:
                return
            if owner and record['owners'].get(instance, owner) != owner:
                return
            port = record['ports'].pop(instance)
            record['owners'].pop(instance, None)
            for driver in self.drivers:
                driver.leases.pop(port['mac'].lower(), None)
            if not record['ports']:
                self._teardown(network_id)

    def _teardown(self, network_id: str) -> None:
        record = self._records.pop(network_id)
        for driver in self.drivers:
            driver.remove_bridge(self.bridge_name(record['network']['vni']))

    def set_peers(self, network_id: str, peers: list[str]) -> None:
        with self._lock:
            self.calls.append(('set_peers', network_id, list(peers)))
            for records in (self._records, self._joined):
                if network_id in records:
                    records[network_id]['peers'] = sorted({p for p in peers if p})

    def networks(self) -> dict[str, dict]:
        with self._lock:
            return copy.deepcopy(self._records)

    def join(self, network: dict, address: str, peers: list[str]) -> str:
        """As NetworkAgent.join, recorded only. :returns: the gateway interface.
        :raises: NetworkError for an address that is no host address of the subnet or a
            VNI that names no device."""
        with self._lock:
            self.calls.append(('join', copy.deepcopy(network), address, list(peers)))
            agent.check_gateway_address(network, address)
            interface = self.gateway_interface(network['vni'])
            self._joined[network['id']] = {
                'network': dict(network), 'address': address,
                'peers': sorted({p for p in peers if p}), 'interface': interface}
            return interface

    def leave(self, network_id: str) -> None:
        """As NetworkAgent.leave: not joined is no error."""
        with self._lock:
            self.calls.append(('leave', network_id))
            self._joined.pop(network_id, None)

    def joined(self) -> dict[str, dict]:
        with self._lock:
            return copy.deepcopy(self._joined)

    def reconcile(self, wanted: dict[str, set[str]], owner: str | None = None) -> None:
        """As NetworkAgent.reconcile: ports of this host not wanted are unplugged (other
        hosts' ports in shared records stay), networks left without ports go."""
        with self._lock:
            self.calls.append(('reconcile', copy.deepcopy(wanted)))
            for network_id, record in list(self._records.items()):
                keep = wanted.get(network_id, set())
                for instance in list(record['ports']):
                    mine = owner or self.conf.host
                    if record['owners'].get(instance, mine) == mine and instance not in keep:
                        self.unplug(network_id, instance)

    def leftovers(self) -> list[str]:
        """What the modelled networks would have made on a host: empty once every
        network is torn down."""
        with self._lock:
            found = set()
            for record in (*self._records.values(), *self._joined.values()):
                vni = record['network']['vni']
                found.add(f'link vmcb{vni}')
                if self.conf.network.vtep_address:
                    found.add(f'link vmcx{vni}')
                found.add(f'nft netdev vmcloud_{vni}_{self.tag}')
            for record in self._records.values():
                found.add(f'link vmcd{record["network"]["vni"]}')
                found.add(f'netns {self._namespace(record)}')
            for record in self._joined.values():
                found |= {f'link vmcg{record["network"]["vni"]}',
                          f'link vmcp{record["network"]["vni"]}'}
            if self._joined:
                found.add(f'nft inet vmcloud_gw_{self.tag}')
            return sorted(found)

    # -- probes ------------------------------------------------------------

    def tcp_connect(self, network_id: str, address: str, port: int, timeout: float) -> None:
        """:raises: NetworkNotFound; NetworkError (refused) unless a running fake guest of
        the network has ``address`` and serves ``port``."""
        self._answer('tcp_connect', network_id, address, port, timeout,
                     f'TCP connection to {address}:{port}', request=False)

    def http_get(self, network_id: str, address: str, port: int, path: str, timeout: float
                 ) -> tuple[int, bytes]:
        """:returns: 200 and the fake guest's "ID N" line, whatever the path (the test
        guest's httpd answers every path alike). :raises: as tcp_connect."""
        answer = self._answer('http_get', network_id, address, port, timeout,
                              f'HTTP GET http://{address}:{port}{path or "/"}', path=path)
        return 200, f'{answer}\n'.encode()

    def _answer(self, method: str, network_id: str, address: str, port: int,
                timeout: float, what: str, path: str | None = None, request: bool = True
                ) -> str:
        with self._lock:
            self.calls.append((method, network_id, address, port,
                               *(() if path is None else (path,)), timeout))
            record = self._record(network_id)
            namespace = self._namespace(record)
            bridge = self.bridge_name(record['network']['vni'])
            drivers = list(self.drivers)
            in_subnet = ipaddress.ip_address(address) in ipaddress.ip_network(
                record['network']['cidr'])
        if not in_subnet:
            # The namespace has no route: only its own subnet is reachable.
            raise exception.NetworkError(
                f'{what} from namespace {namespace}: network is unreachable')
        for driver in drivers:
            answer = driver.answer(bridge, address, int(port), request)
            if answer is not None:
                return answer
        raise exception.NetworkError(f'{what} from namespace {namespace}: connection refused')
