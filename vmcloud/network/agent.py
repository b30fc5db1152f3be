"""The per-host network agent: each guest network present on this host, built from
Linux parts (Neutron's Linux bridge agent and DHCP agent, made small).

Per network (VNI ``V``) on this host:

- bridge ``vmcbV``, no address on it: the guests' taps (made by the driver) and the
  ports below are its ports;
- VXLAN device ``vmcxV`` (unless ``[network] vtep_address`` is empty), a port of the
  bridge, without learning: one all-zero FDB entry per peer VTEP, so broadcast and
  unknown unicast go to every other host of the network (head-end replication, as
  Neutron's l2population does it);
- namespace ``vmcloud-V-<tag>`` holding ``eth0`` (the DHCP port's address) of a veth
  pair whose other end ``vmcdV`` is a port of the bridge; no route, no forwarding;
- one dnsmasq in that namespace, DHCP only, serving this host's ports of the network;
- nftables table ``vmcloud_V_<tag>`` (family netdev) whose one chain drops, at the
  bridge's ingress, every frame the bridge would pass up to this host's own stack. A
  bridge without an address still hands the host its broadcasts and any unicast to it,
  and the host's IPv4 takes them (Linux answers for all its addresses on every
  interface): without the guard a guest reaches the host's services, and a datagram it
  sends to 255.255.255.255:4789 is taken by the host's VXLAN socket and its inner frame
  delivered into another network of this host.

The gateway host joins a network (join()) instead: the same bridge, guard and VXLAN
device (the gateway host is a VTEP at ``[network] vtep_address``), no DHCP, and veth
``vmcgV`` in the host's own namespace holding the subnet's gateway address (.1, see
ipam.gateway_address), whose other end ``vmcpV`` is a port of the bridge: the bridge's
guard does not see it (frames to the gateway leave the bridge through a port, they are
not passed up by the bridge), so the gateway reaches the guests and hears their answers.
It must not be their router, nor a way into itself: one nftables table
``vmcloud_gw_<tag>`` (family inet, one per agent, made before the first vmcg device and
removed after the last) drops everything forwarded from or to a vmcg device (a client
that routes a network's subnet via the gateway host reaches no guest, a guest reaches
no other network) and every packet from a vmcg device that opens something (only the
answers to the gateway's own connections come in: a guest reaches neither the host's
services nor the other deployments' listeners on its .1).

Ownership: the kernel names of these devices carry no owner, yet two agents may share
one network namespace (two clouds on one machine by mistake, two all-in-one test clouds
side by side): each device this agent makes carries the ifalias ``vmcloud:<tag>``. A
device of one of our names that another agent's alias marks is never used, changed or
removed: plug() refuses it.

State: one JSON record per network in ``[network] state_dir``, changed under an flock of
``<state_dir>/lock``: compute managers of one machine sharing the directory share the
bridge, and the network goes when the last port of any of them goes. dnsmasq outlives
the agent (guests keep their leases across a restart); reconcile() picks it up again.
"""
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import time

from oslo_config import cfg

from vmcloud import exception
from vmcloud.network import ipam
from vmcloud.network import linux
from vmcloud.network import probe

LOG = logging.getLogger(__name__)

MAX_IFNAME = 15
ALIAS_PREFIX = 'vmcloud:'
_KINDS = {'vmcb': 'bridge', 'vmcx': 'VXLAN device', 'vmcd': 'veth',
          'vmcg': 'gateway veth', 'vmcp': 'bridge port of the gateway veth'}
ZERO_MAC = '00:00:00:00:00:00'
# dnsmasq gets this long to exit after SIGTERM, then again after SIGKILL.
STOP_TIMEOUT = 5.0
_DEVICE = re.compile(r'^vmc[bxdgp](\d+)$')
GUARD_CHAIN = 'host'
# The gateway guard's chains and rules (see the module's docstring). Made in one nft
# transaction, so a table of this name holding these chains with this many rules each
# is whole.
GATEWAY_RULES = {
    'forward': ('iifname "vmcg*" drop', 'oifname "vmcg*" drop'),
    'input': ('iifname "vmcg*" ct state established,related accept',
              'iifname "vmcg*" drop'),
}
# On the gateway veth: no proxy ARP (the gateway answers for no guest), no reverse path
# filter (the brief's choice: an answer is never dropped for the host's routing), and
# ARP answered only for the veth's own address and sent from it, so a guest learns none
# of the host's other addresses.
GATEWAY_IPV4_CONF = {'proxy_arp': 0, 'rp_filter': 0, 'arp_ignore': 1, 'arp_announce': 2}
_NETWORK_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$')
_HOSTNAME_JUNK = re.compile(r'[^A-Za-z0-9-]+')


def device_name(prefix: str, vni: int) -> str:
    """Network ``vni``'s device of kind ``prefix`` ('vmcb': its bridge, 'vmcx': its VXLAN
    device, 'vmcd': its DHCP veth). :raises: NetworkError if the name cannot be one."""
    name = f'{prefix}{int(vni)}'
    if int(vni) < 1 or len(name) > MAX_IFNAME:
        raise exception.NetworkError(f'VNI {vni} makes device name {name} (at most '
                                     f'{MAX_IFNAME} characters, VNI at least 1)')
    return name


class NetworkAgent:
    def __init__(self, conf: cfg.ConfigOpts, runner: linux.Runner | None = None):
        self.conf = conf
        group = conf.network
        self.state_dir = os.path.realpath(
            group.state_dir or os.path.join(conf.state_path, 'network'))
        # Emulated hosts sharing one kernel share /run/netns: the tag keeps their
        # DHCP namespaces apart, and tells this agent's from another's.
        self.tag = hashlib.sha1(self.state_dir.encode()).hexdigest()[:8]
        self.runner = runner or linux.Runner()
        self._namespace_re = re.compile(rf'^vmcloud-(\d+)-{self.tag}$')
        self._guard_re = re.compile(rf'^vmcloud_(\d+)_{self.tag}$')
        # Set on every device this agent makes in the host's namespace (the DHCP
        # namespaces carry the tag in their names already).
        self.alias = f'{ALIAS_PREFIX}{self.tag}'

    # -- names -------------------------------------------------------------

    def bridge_name(self, vni: int) -> str:
        return self._device('vmcb', vni)

    def gateway_interface(self, vni: int) -> str:
        """The gateway host's interface on network ``vni`` (see join)."""
        return self._device('vmcg', vni)

    def _device(self, prefix: str, vni: int) -> str:
        return device_name(prefix, vni)

    def _gateway_guard_name(self) -> str:
        return f'vmcloud_gw_{self.tag}'

    def _namespace_name(self, vni: int) -> str:
        return f'vmcloud-{int(vni)}-{self.tag}'

    def _guard_name(self, vni: int) -> str:
        # nftables names take no '-'.
        return f'vmcloud_{int(vni)}_{self.tag}'

    def namespace(self, network_id: str) -> str:
        """The DHCP namespace of a network on this host.

        :raises: NetworkNotFound if the network is not on this host.
        """
        record = self._read(network_id)
        if record is None:
            raise exception.NetworkNotFound(network_id)
        return self._namespace_name(record['network']['vni'])

    def _files(self, network_id: str) -> str:
        return os.path.join(self.state_dir, network_id)

    # -- state -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.state_dir, exist_ok=True)
        # flock belongs to the open file: threads of one process opening it each
        # exclude each other as other processes do.
        with open(os.path.join(self.state_dir, 'lock'), 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Then the namespace's lock (always in this order): an agent of another
            # state directory must not see a device between its `ip link add` and its
            # alias, unowned, and adopt it.
            with self.runner.namespace_lock():
                yield

    def _record_path(self, network_id: str) -> str:
        if not _NETWORK_ID.match(network_id or ''):
            raise exception.NetworkError(f'invalid network id {network_id!r}')
        return os.path.join(self.state_dir, f'{network_id}.json')

    def _read(self, network_id: str) -> dict | None:
        try:
            with open(self._record_path(network_id)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise exception.NetworkError(
                f'cannot read the record of network {network_id}: {exc}') from exc

    def _write(self, record: dict) -> None:
        path = self._record_path(record['network']['id'])
        _write_atomically(path, json.dumps(record, indent=1, sort_keys=True))

    def _forget(self, network_id: str) -> None:
        self._forget_dhcp_files(network_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(network_id))

    def _forget_dhcp_files(self, network_id: str) -> None:
        for name in ('hosts', 'leases', 'pid'):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._files(network_id), name))
        with contextlib.suppress(OSError):
            os.rmdir(self._files(network_id))

    def networks(self) -> dict[str, dict]:
        """Network id -> its record: ``network``, ``dhcp_port`` (None while this host
        has no port of it), ``peers``, ``ports`` (instance name -> port), ``owners``
        (instance name -> compute host) and, while this host is the network's gateway,
        ``gateway`` ({'address'}).

        :raises: NetworkError if a record cannot be read.
        """
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.listdir(self.state_dir)):
                if entry.endswith('.json'):
                    record = self._read(entry[:-len('.json')])
                    if record is not None:
                        found[record['network']['id']] = record
        return found

    # -- what is there -----------------------------------------------------

    def _links(self) -> dict[str, dict]:
        out = self.runner.run(['ip', '-j', '-d', 'link', 'show'])
        return {link['ifname']: link for link in json.loads(out or '[]')}

    def _namespaces(self) -> set[str]:
        out = self.runner.run(['ip', '-j', 'netns', 'list'])
        return {entry['name'] for entry in json.loads(out or '[]')}

    def _guards(self) -> tuple[set[str], set[str]]:
        """The netdev tables of nftables, and those of them that hold a guard chain."""
        out = self.runner.run(['nft', '-j', 'list', 'ruleset', 'netdev'])
        items = json.loads(out or '{}').get('nftables', [])
        tables = {item['table']['name'] for item in items if 'table' in item}
        guarded = {item['chain']['table'] for item in items
                   if item.get('chain', {}).get('name') == GUARD_CHAIN}
        return tables, guarded

    def _gateway_guards(self) -> dict[str, dict[str, int]]:
        """The inet tables of nftables: name -> its chains (name -> number of rules)."""
        out = self.runner.run(['nft', '-j', 'list', 'ruleset', 'inet'])
        tables: dict[str, dict[str, int]] = {}
        for item in json.loads(out or '{}').get('nftables', []):
            if 'table' in item:
                tables.setdefault(item['table']['name'], {})
            elif 'chain' in item:
                tables.setdefault(item['chain']['table'], {}).setdefault(
                    item['chain']['name'], 0)
            elif 'rule' in item:
                chains = tables.setdefault(item['rule']['table'], {})
                chains[item['rule']['chain']] = chains.get(item['rule']['chain'], 0) + 1
        return tables

    def _addresses(self, device: str) -> set[str]:
        """The IPv4 addresses ('ADDRESS/PREFIX') of ``device``."""
        out = self.runner.run(['ip', '-j', 'addr', 'show', 'dev', device])
        return {f'{a["local"]}/{a["prefixlen"]}' for link in json.loads(out or '[]')
                for a in link.get('addr_info', ()) if a.get('family') == 'inet'}

    def _fdb_peers(self, vxlan: str) -> set[str]:
        out = self.runner.run(['bridge', '-j', 'fdb', 'show', 'dev', vxlan])
        return {entry['dst'] for entry in json.loads(out or '[]')
                if entry.get('mac') == ZERO_MAC and 'dst' in entry}

    def _dnsmasq_pids(self, network_id: str | None = None) -> list[int]:
        """Our dnsmasq processes (of one network, or all): found by the pid file their
        command line names, so a lost or stale pid file does not hide one."""
        prefix = f'--pid-file={self.state_dir}/'
        if network_id:
            # The whole argument: another network's id may end in this one's.
            wanted = f'{prefix}{network_id}/pid'
            return [pid for pid, argv in self.runner.processes() if wanted in argv]
        return [pid for pid, argv in self.runner.processes()
                if any(a.startswith(prefix) and a.endswith('/pid') for a in argv)]

    def leftovers(self) -> list[str]:
        """Everything of this agent on this host: our devices ('link vmcb1000', those
        with our alias: another agent's in this namespace are not ours), DHCP
        namespaces ('netns vmcloud-1000-TAG'), dnsmasq processes ('dnsmasq PID'),
        guards ('nft netdev vmcloud_1000_TAG') and the gateway guard ('nft inet
        vmcloud_gw_TAG').

        :raises: NetworkError if they cannot be listed.
        """
        found = [f'link {name}' for name, link in sorted(self._links().items())
                 if _DEVICE.match(name) and _alias(link) == self.alias]
        found += [f'netns {ns}' for ns in sorted(self._namespaces())
                  if self._namespace_re.match(ns)]
        found += [f'dnsmasq {pid}' for pid in self._dnsmasq_pids()]
        found += [f'nft netdev {table}' for table in sorted(self._guards()[0])
                  if self._guard_re.match(table)]
        if self._gateway_guard_name() in self._gateway_guards():
            found.append(f'nft inet {self._gateway_guard_name()}')
        return found

    # -- building ----------------------------------------------------------

    def plug(self, network: dict, dhcp_port: dict, peers: list[str], instance: str,
             port: dict, owner: str | None = None) -> str:
        """Make sure the network exists on this host (bridge, vxlan+fdb, namespace,
        dnsmasq), record the instance's port in dnsmasq's hosts file (SIGHUP).
        Idempotent: a second plug of the same port changes nothing; a missing part of
        the network is made again.

        :returns: the bridge name.
        :raises: NetworkError naming the command that failed (nothing half-made is left
            for a new network); NetworkError naming the device and its owner, with
            nothing made, if another agent's device has one of the network's names.
        """
        bridge = self.bridge_name(network['vni'])
        with self._locked():
            self._drop_stale(network)
            links = self._links()
            self._check_owner(links, network['vni'])
            record = self._read(network['id'])
            new = record is None
            if new:
                record = _new_record(network)
            # The first port of a network this host is only the gateway of so far: its
            # DHCP server is new.
            first_port = not record['ports']
            if record.get('dhcp_port') is None:
                record['dhcp_port'] = dict(dhcp_port)
            old_hosts = _hosts_file(record)
            record['peers'] = _peers(peers)
            record['ports'][instance] = dict(port)
            record['owners'][instance] = owner or self.conf.host
            try:
                self._ensure(record, fresh=first_port,
                             hosts_changed=_hosts_file(record) != old_hosts, links=links)
                self._write(record)
            except (exception.NetworkError, OSError) as exc:
                if new:
                    LOG.warning('plugging %s into new network %s failed: removing it (%s)',
                                instance, network['id'], exc)
                    self._teardown(record, best_effort=True)
                    self._forget(network['id'])
                elif first_port:
                    LOG.warning('plugging %s into network %s failed: removing its DHCP '
                                'server (%s)', instance, network['id'], exc)
                    self._remove_dhcp(record, best_effort=True)
                else:
                    with contextlib.suppress(OSError):
                        _write_atomically(os.path.join(self._files(network['id']), 'hosts'),
                                          old_hosts)
                if isinstance(exc, OSError):
                    raise exception.NetworkError(
                        f'cannot write the state of network {network["id"]}: {exc}') from exc
                raise
        LOG.info('plugged %s (%s %s) into network %s (%s)', instance, port['address'],
                 port['mac'], network['id'], bridge)
        return bridge

    def _drop_stale(self, network: dict) -> None:
        """Tear down another network of ours that has this one's VNI: the dispatcher gives
        a VNI again only once it released the network that had it, so what is left of
        that one here (an unplug that failed, a host that missed the delete) is stale,
        and its devices, which have this network's names, must not be taken for this
        one's (its veth has the old subnet's address, its dnsmasq the old hosts).

        :raises: NetworkError if it cannot be torn down (this network is not made)."""
        for other_id, other in self.networks().items():
            if other_id != network['id'] and other['network']['vni'] == network['vni']:
                LOG.warning('network %s takes VNI %d of network %s, which is gone: tearing '
                            'down what is left of that one here', network['id'],
                            network['vni'], other_id)
                self._teardown(other)
                self._forget(other_id)

    def _check_owner(self, links: dict[str, dict], vni: int) -> None:
        """:raises: NetworkError if a device of the network's names is another agent's."""
        for prefix, kind in _KINDS.items():
            name = self._device(prefix, vni)
            owner = _alias(links.get(name, {}))
            if owner and owner != self.alias:
                raise exception.NetworkError(
                    f'{kind} {name} belongs to another vmcloud network agent ({owner}): '
                    f'one machine namespace serves one cloud')

    def _claim(self, name: str, links: dict[str, dict]) -> None:
        """Mark ``name`` ours unless it is: a device just made, or one without an alias
        (left by an agent from before aliases, or by us between add and alias)."""
        if _alias(links.get(name, {})) != self.alias:
            self.runner.run(['ip', 'link', 'set', name, 'alias', self.alias])

    def _ensure(self, record: dict, fresh: bool = False, hosts_changed: bool = True,
                links: dict[str, dict] | None = None) -> None:
        """Make every missing part of the network: its segment (bridge, guard, VXLAN
        device); while it has ports, its DHCP server, whose dnsmasq serves them
        (started if it is not running, else told of a changed hosts file); while this
        host is its gateway, the gateway veth. ``links``: what _links() just said, when
        the caller has it; ``fresh``: the DHCP server is new (no dnsmasq to look for).

        :raises: NetworkError (also for a device of another agent, before any
            change), OSError.
        """
        vni = record['network']['vni']
        # Listed even for a new network: a device of its names may be there already
        # (another agent's, which stops us here, or one left unowned).
        links = self._links() if links is None else links
        self._check_owner(links, vni)
        self._ensure_segment(record, links)
        if record['ports']:
            self._ensure_dhcp(record, links, fresh, hosts_changed)
        if record.get('gateway'):
            self._ensure_gateway(record, links)

    def _ensure_segment(self, record: dict, links: dict[str, dict]) -> None:
        """The bridge, its guard, the VXLAN device and its FDB entries (to the record's
        peers). :raises: NetworkError."""
        vni = record['network']['vni']
        bridge, vxlan = self._device('vmcb', vni), self._device('vmcx', vni)
        mtu = str(self.conf.network.mtu)
        vtep = self.conf.network.vtep_address
        run = self.runner.run

        bridge_made = bridge not in links
        if bridge_made:
            run(['ip', 'link', 'add', bridge, 'mtu', mtu, 'type', 'bridge'])
            self.runner.disable_ipv6(bridge)
        self._claim(bridge, links)
        # Before the bridge is up; made again with a bridge made again (a chain's hook
        # is on the device it was made for).
        self._guard(vni, bridge, remake=bridge_made)
        if 'UP' not in links.get(bridge, {}).get('flags', ()):
            run(['ip', 'link', 'set', bridge, 'up'])

        if vtep:
            if vxlan not in links:
                # VXLAN adds 50 bytes: the underlay must carry mtu + 50.
                run(['ip', 'link', 'add', vxlan, 'mtu', mtu, 'type', 'vxlan', 'id', str(vni),
                     'dstport', str(self.conf.network.vxlan_port), 'local', vtep,
                     'nolearning'])
                self.runner.disable_ipv6(vxlan)
            self._claim(vxlan, links)
            link = links.get(vxlan, {})
            if link.get('master') != bridge or 'UP' not in link.get('flags', ()):
                run(['ip', 'link', 'set', vxlan, 'master', bridge, 'up'])
            self._sync_fdb(vxlan, record['peers'], set() if vxlan not in links else None)

    def _ensure_dhcp(self, record: dict, links: dict[str, dict], fresh: bool,
                     hosts_changed: bool) -> None:
        """The DHCP namespace, its veth on the bridge, dnsmasq serving the record's
        ports. :raises: NetworkError, OSError."""
        network, dhcp = record['network'], record['dhcp_port']
        vni = network['vni']
        bridge, veth = self._device('vmcb', vni), self._device('vmcd', vni)
        namespace = self._namespace_name(vni)
        mtu = str(self.conf.network.mtu)
        run = self.runner.run
        namespaces = self._namespaces()

        if namespace not in namespaces:
            if veth in links:
                # Its peer went with the old namespace (or never was in this one).
                run(['ip', 'link', 'del', veth])
                del links[veth]
            run(['ip', 'netns', 'add', namespace])
            run(['ip', '-n', namespace, 'link', 'set', 'lo', 'up'])
        eth0_made = veth not in links
        if eth0_made:
            prefix = ipaddress.ip_network(network['cidr']).prefixlen
            run(['ip', 'link', 'add', veth, 'mtu', mtu, 'type', 'veth',
                 'peer', 'name', 'eth0', 'mtu', mtu, 'netns', namespace])
            self.runner.disable_ipv6(veth)
            self._claim(veth, {})
            run(['ip', '-n', namespace, 'link', 'set', 'eth0', 'address', dhcp['mac']])
            run(['ip', '-n', namespace, 'addr', 'add', f'{dhcp["address"]}/{prefix}',
                 'dev', 'eth0'])
            run(['ip', '-n', namespace, 'link', 'set', 'eth0', 'up'])
        else:
            self._claim(veth, links)
        link = links.get(veth, {})
        if link.get('master') != bridge or 'UP' not in link.get('flags', ()):
            run(['ip', 'link', 'set', veth, 'master', bridge, 'up'])

        files = self._files(network['id'])
        os.makedirs(files, exist_ok=True)
        hosts = os.path.join(files, 'hosts')
        if hosts_changed or not os.path.exists(hosts):
            _write_atomically(hosts, _hosts_file(record))
        pids = [] if fresh else self._dnsmasq_pids(network['id'])
        if pids and eth0_made:
            # It serves the eth0 that went (in the namespace that went, if that was
            # deleted: dnsmasq keeps it alive, unnamed), not the new one.
            LOG.info('network %s: restarting dnsmasq %s on its new eth0', network['id'], pids)
            self._stop_dnsmasq(network['id'], pids)
            pids = []
        if not pids:
            self._start_dnsmasq(record, namespace, files)
        elif hosts_changed:
            for pid in pids:
                # SIGHUP: dnsmasq reads --dhcp-hostsfile again.
                self.runner.kill(pid, signal.SIGHUP)

    def _guard(self, vni: int, bridge: str, remake: bool = False) -> None:
        """The bridge's guard (see the module's docstring): a netdev table whose chain,
        on the bridge's ingress (what the bridge passes up to this host, not what it
        forwards between its ports), drops everything. Made unless it is there."""
        table = self._guard_name(vni)
        tables, guarded = self._guards()
        if table in guarded and not remake:
            return
        if table in tables:
            self.runner.run(['nft', 'delete', 'table', 'netdev', table])
        self.runner.run(['nft', 'add', 'table', 'netdev', table])
        self.runner.run(['nft', 'add', 'chain', 'netdev', table, GUARD_CHAIN,
                         f'{{ type filter hook ingress device "{bridge}" priority 0; '
                         f'policy drop; }}'])

    def _delete_guard(self, vni: int) -> None:
        table = self._guard_name(vni)
        if table in self._guards()[0]:
            self.runner.run(['nft', 'delete', 'table', 'netdev', table])

    def _ensure_gateway(self, record: dict, links: dict[str, dict]) -> None:
        """The gateway veth (see join): made with its address, or given back what it
        lost (its address, a port of the bridge, up); the gateway guard before it.

        :raises: NetworkError.
        """
        vni = record['network']['vni']
        bridge, interface, port = (self._device(p, vni) for p in ('vmcb', 'vmcg', 'vmcp'))
        prefix = ipaddress.ip_network(record['network']['cidr']).prefixlen
        gateway = record['gateway']['address']
        address = f'{gateway}/{prefix}'
        mtu = str(self.conf.network.mtu)
        run = self.runner.run
        # Before the interface exists: the host never forwards for it, not for a moment.
        self._gateway_guard()
        if interface not in links:
            if port in links:
                # Half of a pair whose other end went with a namespace or by hand.
                self._delete_link(port)
                del links[port]
            # The MAC of the address, as for a port (ipam.mac_for): a joining again
            # gateway answers with the MAC the guests' ARP caches have.
            run(['ip', 'link', 'add', interface, 'mtu', mtu,
                 'address', ipam.mac_for(gateway, vni), 'type', 'veth',
                 'peer', 'name', port, 'mtu', mtu])
            for name in (interface, port):
                self.runner.disable_ipv6(name)
                self._claim(name, {})
            self.runner.ipv4_conf(interface, GATEWAY_IPV4_CONF)
            addresses: set[str] = set()
        else:
            self._claim(interface, links)
            self._claim(port, links)
            addresses = self._addresses(interface)
        for stale in sorted(addresses - {address}):
            run(['ip', 'addr', 'del', stale, 'dev', interface])
        if address not in addresses:
            run(['ip', 'addr', 'add', address, 'dev', interface])
        link = links.get(port, {})
        if link.get('master') != bridge or 'UP' not in link.get('flags', ()):
            run(['ip', 'link', 'set', port, 'master', bridge, 'up'])
        if 'UP' not in links.get(interface, {}).get('flags', ()):
            run(['ip', 'link', 'set', interface, 'up'])

    def _gateway_guard(self) -> None:
        """The gateway guard (see the module's docstring), unless it is there whole:
        replaced in one nft transaction (made if missing, then deleted, then made), so
        there is never a moment without it once it was there.

        :raises: NetworkError.
        """
        table = self._gateway_guard_name()
        wanted = {chain: len(rules) for chain, rules in GATEWAY_RULES.items()}
        if self._gateway_guards().get(table) == wanted:
            return
        chains = ' '.join(
            f'chain {chain} {{ type filter hook {chain} priority 0; policy accept; '
            + ' '.join(f'{rule};' for rule in rules) + ' };'
            for chain, rules in GATEWAY_RULES.items())
        self.runner.run(['nft', f'table inet {table}; delete table inet {table}; '
                                f'table inet {table} {{ {chains} }}'])

    def _delete_gateway_guard(self) -> None:
        table = self._gateway_guard_name()
        if table in self._gateway_guards():
            self.runner.run(['nft', 'delete', 'table', 'inet', table])

    def _start_dnsmasq(self, record: dict, namespace: str, files: str) -> None:
        subnet = ipaddress.ip_network(record['network']['cidr'])
        run_dir = files
        self.runner.run([
            'ip', 'netns', 'exec', namespace, self.conf.network.dnsmasq,
            '--conf-file=/dev/null', '--no-hosts', '--no-resolv',
            # DHCP only: no DNS server, and no router or DNS server handed out (an
            # option given without a value is not sent).
            '--port=0', '--dhcp-option=3', '--dhcp-option=6',
            '--bind-interfaces', '--interface=eth0', '--except-interface=lo',
            # As root: its files live in the agent's state directory, which the user
            # dnsmasq would switch to may not read (it reads the hosts file again on
            # SIGHUP). It runs alone in a namespace that holds only the guest network.
            '--user=root', '--group=root',
            f'--pid-file={run_dir}/pid',
            f'--dhcp-hostsfile={run_dir}/hosts',
            f'--dhcp-leasefile={run_dir}/leases',
            f'--dhcp-range={subnet.network_address},static,{subnet.netmask},'
            f'{self.conf.network.dhcp_lease}',
        ])

    def _sync_fdb(self, vxlan: str, peers: list[str], current: set[str] | None = None) -> None:
        current = self._fdb_peers(vxlan) if current is None else current
        wanted = set(peers)
        for peer in sorted(wanted - current):
            self.runner.run(['bridge', 'fdb', 'append', ZERO_MAC, 'dev', vxlan, 'dst', peer])
        for peer in sorted(current - wanted):
            self.runner.run(['bridge', 'fdb', 'del', ZERO_MAC, 'dev', vxlan, 'dst', peer])

    def set_peers(self, network_id: str, peers: list[str]) -> None:
        """Replace the network's peer VTEPs (its FDB entries); unknown id: nothing.

        :raises: NetworkError.
        """
        with self._locked():
            record = self._read(network_id)
            if record is None:
                return
            record['peers'] = _peers(peers)
            if self.conf.network.vtep_address:
                self._sync_fdb(self._device('vmcx', record['network']['vni']), record['peers'])
            self._write(record)

    # -- the gateway host --------------------------------------------------

    def join(self, network: dict, address: str, peers: list[str]) -> str:
        """Put this host on ``network`` ({'id', 'vni', 'cidr'}) as its gateway: the
        network's bridge, guard and VXLAN device as on a compute host (FDB entries to
        ``peers``, the VTEPs of the hosts of its guests), and ``address`` (the subnet's
        gateway address, ipam.gateway_address) on the veth ``vmcgV`` in this host's own
        namespace, whose other end is a port of the bridge; no DHCP server. The host
        reaches the guests then, but neither forwards to or from them nor takes a
        connection from them (the gateway guard, see the module's docstring).
        Idempotent: joining again makes what is missing and takes the new peers (as
        set_peers) and address.

        :returns: the host-side interface (vmcgV).
        :raises: NetworkError for an address that is no host address of the subnet, for
            a device of the network's names that another agent made (nothing made), or
            naming the command that failed (nothing of a network new here is left).
        """
        check_gateway_address(network, address)
        interface = self.gateway_interface(network['vni'])
        with self._locked():
            self._drop_stale(network)
            links = self._links()
            self._check_owner(links, network['vni'])
            record = self._read(network['id'])
            new = record is None
            if new:
                record = _new_record(network)
            was_joined = bool(record.get('gateway'))
            record['peers'] = _peers(peers)
            record['gateway'] = {'address': address}
            try:
                self._ensure(record, hosts_changed=False, links=links)
                self._write(record)
            except (exception.NetworkError, OSError) as exc:
                if not was_joined:
                    LOG.warning('joining network %s failed: removing what was made (%s)',
                                network['id'], exc)
                    self._unjoin(record, whole=new, best_effort=True)
                if isinstance(exc, OSError):
                    raise exception.NetworkError(
                        f'cannot write the state of network {network["id"]}: {exc}') from exc
                raise
        LOG.info('joined network %s (%s) as its gateway, %s on %s', network['id'],
                 network['cidr'], address, interface)
        return interface

    def leave(self, network_id: str) -> None:
        """Take this host off the network as its gateway: the gateway veth goes, and
        the rest of the network with it unless ports of this host's guests need it
        (one agent for the compute host and the gateway: the all-in-one), and the
        gateway guard with the last network joined. Not joined: nothing.

        :raises: NetworkError naming what could not be removed (the network stays
            joined: leave or reconcile again).
        """
        with self._locked():
            record = self._read(network_id)
            if record is None or not record.get('gateway'):
                return
            self._unjoin(record, whole=not record['ports'])
            if record['ports']:
                del record['gateway']
                self._write(record)
        LOG.info('left network %s', network_id)

    def _unjoin(self, record: dict, whole: bool, best_effort: bool = False) -> None:
        """Remove the gateway veth, or the ``whole`` network (no port needs it: its
        record is forgotten too), then the gateway guard unless another record is
        joined.

        :raises: NetworkError, unless ``best_effort`` (logged only).
        """
        network_id = record['network']['id']
        vni = record['network']['vni']
        try:
            if whole:
                self._teardown(record)
            else:
                self._delete_links([self._device(p, vni) for p in ('vmcg', 'vmcp')])
            if not any(r.get('gateway') for i, r in self.networks().items()
                       if i != network_id):
                self._delete_gateway_guard()
        except exception.NetworkError as exc:
            if not best_effort:
                raise
            LOG.warning('leaving network %s: %s', network_id, exc)
        if whole:
            self._forget(network_id)

    def joined(self) -> dict[str, dict]:
        """Network id -> ``network``, ``address``, ``peers`` and ``interface`` of each
        network this host is the gateway of.

        :raises: NetworkError if a record cannot be read.
        """
        return {network_id: {'network': record['network'],
                             'address': record['gateway']['address'],
                             'peers': record['peers'],
                             'interface': self.gateway_interface(record['network']['vni'])}
                for network_id, record in self.networks().items() if record.get('gateway')}

    # -- probes ------------------------------------------------------------

    def tcp_connect(self, network_id: str, address: str, port: int, timeout: float) -> None:
        """Open (and close) a TCP connection to ``address:port`` from the network's DHCP
        namespace (see vmcloud.network.probe).

        :raises: NetworkNotFound if the network is not on this host; NetworkError
            (unreachable, refused, timed out) naming address, port and namespace.
        """
        probe.tcp_connect(self.namespace(network_id), address, port, timeout)

    def http_get(self, network_id: str, address: str, port: int, path: str, timeout: float
                 ) -> tuple[int, bytes]:
        """GET ``http://address:port/path`` from the network's DHCP namespace.

        :returns: the status and the body (at most 64 KiB of it).
        :raises: as tcp_connect; NetworkError also for an answer that is not HTTP.
        """
        return probe.http_get(self.namespace(network_id), address, port, path, timeout)

    # -- tearing down ------------------------------------------------------

    def unplug(self, network_id: str, instance: str, owner: str | None = None) -> None:
        """Forget the port; tear the network down when it was the last one. Unknown
        ids and instances: no error. With ``owner``, only a port that compute host
        plugged (managers of one machine share the records, and an instance rebuilt on
        another of them has its port there under the same name).

        :raises: NetworkError if dnsmasq cannot be told or the network torn down (its
            record stays, without ports: reconcile() tears it down).
        """
        with self._locked():
            record = self._read(network_id)
            if record is None or instance not in record['ports']:
                return
            if owner and record.get('owners', {}).get(instance, owner) != owner:
                return
            del record['ports'][instance]
            record.get('owners', {}).pop(instance, None)
            self._settle(record)
        LOG.info('unplugged %s from network %s', instance, network_id)

    def _settle(self, record: dict) -> None:
        """Write a record whose ports changed: its network kept right while it has
        ports or this host is its gateway (without ports: no DHCP server), torn down
        with its last port otherwise. :raises: NetworkError, OSError."""
        if record['ports']:
            self._write(record)
            self._ensure(record)
        elif record.get('gateway'):
            self._remove_dhcp(record)
            # The dispatcher gives the next first port's DHCP port anew.
            record['dhcp_port'] = None
            self._write(record)
            self._ensure(record)
        else:
            self._write(record)
            self._teardown(record)
            self._forget(record['network']['id'])

    def _teardown(self, record: dict, best_effort: bool = False) -> None:
        """dnsmasq, then the namespace (with eth0 and so its veth peer), the veth, the
        VXLAN device, the bridge, its guard; each only if there.

        :raises: NetworkError naming the first step that failed, after trying every
            step (unless ``best_effort``: logged only).
        """
        vni = record['network']['vni']
        self._steps(record, 'tear down', best_effort, [
            (self._stop_dnsmasq, record['network']['id']),
            (self._delete_namespace, self._namespace_name(vni)),
            (self._delete_links, [self._device(p, vni)
                                  for p in ('vmcd', 'vmcg', 'vmcp', 'vmcx', 'vmcb')]),
            (self._delete_guard, vni)])

    def _remove_dhcp(self, record: dict, best_effort: bool = False) -> None:
        """The network's DHCP server (dnsmasq, namespace, veth) and its files; the
        segment stays for the gateway. :raises: as _teardown."""
        vni = record['network']['vni']
        self._steps(record, 'remove the DHCP server of', best_effort, [
            (self._stop_dnsmasq, record['network']['id']),
            (self._delete_namespace, self._namespace_name(vni)),
            (self._delete_links, [self._device('vmcd', vni)])])
        self._forget_dhcp_files(record['network']['id'])

    def _steps(self, record: dict, what: str, best_effort: bool, steps: list) -> None:
        """Run every (function, argument) of ``steps``, also after one failed.

        :raises: NetworkError naming ``what`` was done to the network and the first
            step that failed (unless ``best_effort``: logged only).
        """
        network_id = record['network']['id']
        vni = record['network']['vni']
        errors: list[exception.NetworkError] = []
        for fn, arg in steps:
            try:
                fn(arg)
            except exception.NetworkError as exc:
                LOG.warning('%s network %s: %s', what, network_id, exc)
                errors.append(exc)
        if errors and not best_effort:
            raise exception.NetworkError(
                f'cannot {what} network {network_id} (VNI {vni}): {errors[0]}'
            ) from errors[0]

    def _stop_dnsmasq(self, network_id: str | None = None, pids: list[int] | None = None
                      ) -> None:
        pids = self._dnsmasq_pids(network_id) if pids is None else pids
        for signum in (signal.SIGTERM, signal.SIGKILL):
            pids = [pid for pid in pids if self.runner.kill(pid, signum)]
            deadline = time.monotonic() + STOP_TIMEOUT
            while pids and time.monotonic() < deadline:
                time.sleep(0.02)
                pids = [pid for pid in pids if self.runner.cmdline(pid) is not None]
            if not pids:
                return
        raise exception.NetworkError(
            f'dnsmasq {", ".join(map(str, pids))} of network {network_id} outlived SIGKILL')

    def _delete_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces():
            self.runner.run(['ip', 'netns', 'delete', namespace])

    def _delete_links(self, names: list[str]) -> None:
        links = self._links()
        for name in names:
            owner = _alias(links.get(name, {}))
            if owner and owner != self.alias:
                # Another agent's, made after ours went (or ours never was): not ours
                # to remove.
                LOG.warning('leaving %s: it belongs to another vmcloud network agent (%s)',
                            name, owner)
            elif name in links:
                self._delete_link(name)

    def _delete_link(self, name: str) -> None:
        """:raises: NetworkError unless ``name`` is gone (also when it went meanwhile)."""
        try:
            self.runner.run(['ip', 'link', 'del', name])
        except exception.NetworkError:
            # A veth goes with its peer (deleted before it, or with its namespace a
            # moment ago): gone by now is what was wanted.
            if name in self._links():
                raise

    # -- after a restart ---------------------------------------------------

    def reconcile(self, wanted: dict[str, set[str]], owner: str | None = None) -> None:
        """After a restart: ``wanted`` = network id -> instance names that should stay
        plugged on this host. Ports not wanted are unplugged, networks left without
        ports torn down (unless this host is their gateway: only their DHCP server
        goes), a dead dnsmasq restarted, a missing device recreated (the gateway's
        too); devices, namespaces, guards and dnsmasqs named like ours but in no
        record (or of a part no record needs) removed. Joined networks stay joined:
        leave() is how the gateway leaves one.
        Only ports compute host ``owner`` (default ``[DEFAULT] host``) plugged are
        considered (managers of one machine share the records).

        :raises: NetworkError naming the first network that could not be reconciled,
            after trying every one.
        """
        errors = []
        with self._locked():
            records = self.networks()
            for network_id, record in records.items():
                keep = wanted.get(network_id, set())
                owners = record.setdefault('owners', {})
                mine = owner or self.conf.host
                for instance in list(record['ports']):
                    if owners.get(instance, mine) == mine and instance not in keep:
                        LOG.info('reconcile: unplugging %s from network %s', instance,
                                 network_id)
                        del record['ports'][instance]
                        owners.pop(instance, None)
                try:
                    self._settle(record)
                except (exception.NetworkError, OSError) as exc:
                    errors.append(exc)
            try:
                self._remove_strays(self.networks())
            except (exception.NetworkError, OSError) as exc:
                errors.append(exc)
        if errors:
            raise exception.NetworkError(f'reconcile: {errors[0]}') from errors[0]

    def _remove_strays(self, records: dict[str, dict]) -> None:
        """Remove what is ours but no record needs: dnsmasq and DHCP parts of networks
        without ports, gateway veths of networks not joined, segments of neither, the
        gateway guard with no network joined. :raises: NetworkError."""
        served = {r['network']['vni'] for r in records.values() if r['ports']}
        joined = {r['network']['vni'] for r in records.values() if r.get('gateway')}
        vnis = served | joined
        needed = {'vmcd': served, 'vmcg': joined, 'vmcp': joined, 'vmcx': vnis, 'vmcb': vnis}
        network_ids = {i for i, r in records.items() if r['ports']}
        strays = [pid for pid, argv in self.runner.processes()
                  if any(a.startswith(f'--pid-file={self.state_dir}/') and
                         a[len(f'--pid-file={self.state_dir}/'):-len('/pid')]
                         not in network_ids for a in argv)]
        if strays:
            LOG.info('reconcile: stopping dnsmasq %s of no network', strays)
            self._stop_dnsmasq(None, strays)
        for namespace in sorted(self._namespaces()):
            match = self._namespace_re.match(namespace)
            if match and int(match.group(1)) not in served:
                LOG.info('reconcile: deleting namespace %s of no network', namespace)
                self.runner.run(['ip', 'netns', 'delete', namespace])
        links = self._links()
        for kind, vnis_of_kind in needed.items():
            for name in sorted(links):
                match = _DEVICE.match(name)
                # Only devices with our alias. Not another agent's sharing this
                # namespace; and not one without an alias either: it may be a device
                # of an agent from before aliases (or of another cloud's such agent)
                # whose network this agent has no record of. An unaliased device of a
                # network we do have a record of is adopted by _ensure instead.
                if name.startswith(kind) and match and \
                        int(match.group(1)) not in vnis_of_kind and \
                        _alias(links[name]) == self.alias:
                    LOG.info('reconcile: deleting device %s of no network', name)
                    self._delete_link(name)
        for table in sorted(self._guards()[0]):
            match = self._guard_re.match(table)
            if match and int(match.group(1)) not in vnis:
                LOG.info('reconcile: deleting guard %s of no network', table)
                self.runner.run(['nft', 'delete', 'table', 'netdev', table])
        if not joined:
            self._delete_gateway_guard()


def _alias(link: dict) -> str:
    """The ifalias of a link as `ip -j -d link show` lists it ('' for none)."""
    return link.get('ifalias') or ''


def _new_record(network: dict) -> dict:
    return {'network': dict(network), 'dhcp_port': None, 'peers': [], 'ports': {},
            'owners': {}}


def check_gateway_address(network: dict, address: str) -> None:
    """:raises: NetworkError unless ``address`` is a host address of the network's
    subnet (not its own address, not its broadcast address)."""
    try:
        subnet = ipaddress.IPv4Network(network['cidr'])
        host = ipaddress.IPv4Address(address)
    except (ValueError, TypeError) as exc:
        raise exception.NetworkError(
            f'network {network.get("id")}: bad gateway address {address!r} or subnet '
            f'{network.get("cidr")!r}: {exc}') from exc
    if host not in subnet or host in (subnet.network_address, subnet.broadcast_address):
        raise exception.NetworkError(
            f'network {network["id"]}: gateway address {address} is no host address of '
            f'its subnet {network["cidr"]}')


def _peers(peers: list[str]) -> list[str]:
    return sorted({p for p in peers if p})


def _hosts_file(record: dict) -> str:
    """dnsmasq's --dhcp-hostsfile: MAC,ADDRESS,NAME per port of this host."""
    lines = []
    for instance, port in sorted(record['ports'].items()):
        name = _HOSTNAME_JUNK.sub('-', instance).strip('-')[:63] or 'guest'
        lines.append(f'{port["mac"]},{port["address"]},{name}\n')
    return ''.join(lines)


def _write_atomically(path: str, text: str) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)
