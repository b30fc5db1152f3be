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
from vmcloud.network import linux
from vmcloud.network import probe

LOG = logging.getLogger(__name__)

MAX_IFNAME = 15
ALIAS_PREFIX = 'vmcloud:'
_KINDS = {'vmcb': 'bridge', 'vmcx': 'VXLAN device', 'vmcd': 'veth'}
ZERO_MAC = '00:00:00:00:00:00'
# dnsmasq gets this long to exit after SIGTERM, then again after SIGKILL.
STOP_TIMEOUT = 5.0
_DEVICE = re.compile(r'^vmc[bxd](\d+)$')
GUARD_CHAIN = 'host'
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

    def _device(self, prefix: str, vni: int) -> str:
        return device_name(prefix, vni)

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
        for name in ('hosts', 'leases', 'pid'):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._files(network_id), name))
        with contextlib.suppress(OSError):
            os.rmdir(self._files(network_id))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(network_id))

    def networks(self) -> dict[str, dict]:
        """Network id -> its record: ``network``, ``dhcp_port``, ``peers``, ``ports``
        (instance name -> port) and ``owners`` (instance name -> compute host).

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
        namespaces ('netns vmcloud-1000-TAG'), dnsmasq processes ('dnsmasq PID') and
        guards ('nft netdev vmcloud_1000_TAG').

        :raises: NetworkError if they cannot be listed.
        """
        found = [f'link {name}' for name, link in sorted(self._links().items())
                 if _DEVICE.match(name) and _alias(link) == self.alias]
        found += [f'netns {ns}' for ns in sorted(self._namespaces())
                  if self._namespace_re.match(ns)]
        found += [f'dnsmasq {pid}' for pid in self._dnsmasq_pids()]
        found += [f'nft netdev {table}' for table in sorted(self._guards()[0])
                  if self._guard_re.match(table)]
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
                record = {'network': dict(network), 'dhcp_port': dict(dhcp_port),
                          'peers': [], 'ports': {}, 'owners': {}}
            old_hosts = _hosts_file(record)
            record['peers'] = _peers(peers)
            record['ports'][instance] = dict(port)
            record['owners'][instance] = owner or self.conf.host
            try:
                self._ensure(record, fresh=new, hosts_changed=_hosts_file(record) != old_hosts,
                             links=links)
                self._write(record)
            except (exception.NetworkError, OSError) as exc:
                if new:
                    LOG.warning('plugging %s into new network %s failed: removing it (%s)',
                                instance, network['id'], exc)
                    self._teardown(record, best_effort=True)
                    self._forget(network['id'])
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
        """Make every missing part of the network, then its dnsmasq serve the record's
        ports: started if it is not running, else told of a changed hosts file.
        ``links``: what _links() just said, when the caller has it.

        :raises: NetworkError (also for a device of another agent, before any
            change), OSError.
        """
        network, dhcp = record['network'], record['dhcp_port']
        vni = network['vni']
        bridge, vxlan, veth = (self._device(p, vni) for p in ('vmcb', 'vmcx', 'vmcd'))
        namespace = self._namespace_name(vni)
        mtu = str(self.conf.network.mtu)
        vtep = self.conf.network.vtep_address
        run = self.runner.run
        # Listed even for a new network: a device of its names may be there already
        # (another agent's, which stops us here, or one left unowned).
        links = self._links() if links is None else links
        self._check_owner(links, vni)
        namespaces = self._namespaces()

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
        ports, torn down with its last. :raises: NetworkError, OSError."""
        self._write(record)
        if record['ports']:
            self._ensure(record)
        else:
            self._teardown(record)
            self._forget(record['network']['id'])

    def _teardown(self, record: dict, best_effort: bool = False) -> None:
        """dnsmasq, then the namespace (with eth0 and so its veth peer), the veth, the
        VXLAN device, the bridge, its guard; each only if there.

        :raises: NetworkError naming the first step that failed, after trying every
            step (unless ``best_effort``: logged only).
        """
        network_id = record['network']['id']
        vni = record['network']['vni']
        namespace = self._namespace_name(vni)
        errors: list[exception.NetworkError] = []

        def step(fn, *args):
            try:
                fn(*args)
            except exception.NetworkError as exc:
                LOG.warning('tearing down network %s: %s', network_id, exc)
                errors.append(exc)

        step(self._stop_dnsmasq, network_id)
        step(self._delete_namespace, namespace)
        step(self._delete_links, [self._device(p, vni) for p in ('vmcd', 'vmcx', 'vmcb')])
        step(self._delete_guard, vni)
        if errors and not best_effort:
            raise exception.NetworkError(
                f'cannot tear down network {network_id} (VNI {vni}): {errors[0]}'
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
                try:
                    self.runner.run(['ip', 'link', 'del', name])
                except exception.NetworkError:
                    # The kernel removes a veth whose peer's namespace was deleted a
                    # moment later: gone by now is what was wanted.
                    if name in self._links():
                        raise

    # -- after a restart ---------------------------------------------------

    def reconcile(self, wanted: dict[str, set[str]], owner: str | None = None) -> None:
        """After a restart: ``wanted`` = network id -> instance names that should stay
        plugged on this host. Ports not wanted are unplugged, networks left without
        ports torn down, a dead dnsmasq restarted, a missing device recreated;
        devices, namespaces and dnsmasqs named like ours but in no record removed.
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
                self._remove_strays({r['network']['vni'] for r in records.values()
                                     if r['ports']}, set(self.networks()))
            except exception.NetworkError as exc:
                errors.append(exc)
        if errors:
            raise exception.NetworkError(f'reconcile: {errors[0]}') from errors[0]

    def _remove_strays(self, vnis: set[int], network_ids: set[str]) -> None:
        strays = [pid for pid, argv in self.runner.processes()
                  if any(a.startswith(f'--pid-file={self.state_dir}/') and
                         a[len(f'--pid-file={self.state_dir}/'):-len('/pid')]
                         not in network_ids for a in argv)]
        if strays:
            LOG.info('reconcile: stopping dnsmasq %s of no network', strays)
            self._stop_dnsmasq(None, strays)
        for namespace in sorted(self._namespaces()):
            match = self._namespace_re.match(namespace)
            if match and int(match.group(1)) not in vnis:
                LOG.info('reconcile: deleting namespace %s of no network', namespace)
                self.runner.run(['ip', 'netns', 'delete', namespace])
        links = self._links()
        for kind in ('vmcd', 'vmcx', 'vmcb'):
            for name in sorted(links):
                match = _DEVICE.match(name)
                # Only devices with our alias. Not another agent's sharing this
                # namespace; and not one without an alias either: it may be a device
                # of an agent from before aliases (or of another cloud's such agent)
                # whose network this agent has no record of. An unaliased device of a
                # network we do have a record of is adopted by _ensure instead.
                if name.startswith(kind) and match and int(match.group(1)) not in vnis \
                        and _alias(links[name]) == self.alias:
                    LOG.info('reconcile: deleting device %s of no network', name)
                    self.runner.run(['ip', 'link', 'del', name])
        for table in sorted(self._guards()[0]):
            match = self._guard_re.match(table)
            if match and int(match.group(1)) not in vnis:
                LOG.info('reconcile: deleting guard %s of no network', table)
                self.runner.run(['nft', 'delete', 'table', 'netdev', table])


def _alias(link: dict) -> str:
    """The ifalias of a link as `ip -j -d link show` lists it ('' for none)."""
    return link.get('ifalias') or ''


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
