"""Guest networks on emulated hosts (issue 15): a deployment's network across two compute
hosts over VXLAN, isolated from another deployment and from a host outside the cloud,
put right by a restarted compute service, and gone with its deployment; images without
vmcloud's markers, active by their health check.

What runs where (tests/multihost/cluster.py): the controller, compute hosts node1 and
node2 (each a VTEP at its own address, its agent's state in its own directory), and a
host ``client`` on the same switch that is no part of the cloud. The first deployment
of a fresh cloud gets the first subnet of ``[network] cidr_pool`` (10.200.0.0/24) and
its instances its addresses from .2 up, which is what lets a guest's kernel command
line name its peers before they exist (the test checks the allocation it relied on).

Isolation is tested where it could fail, not where routing alone would stop traffic:
the client host and the stranger guests of the second deployment all hold an address
*in the first deployment's subnet* (the stranger guests by ``vmcloud.ip``), so only the
separation of the L2 segments (a bridge per network, a VNI per network, nothing of
the underlay bridged in) keeps them apart; each side answers HTTP and each side probes
the other. Positive controls show every server that must not be reached does answer
where it may be (the client its own address, a stranger guest itself).

Leaks: every test ends (also when it fails) by checking that nothing of its cloud is
left on the machine, the network agents' DHCP namespaces and dnsmasq processes
included (NetworkTestCase.assert_nothing_left); the names it checks belong to this
cloud alone, so the check holds under stestr's concurrency, which a test "run last"
could not promise (workers run their tests in no common order, and other clouds of
other workers or runs are alive meanwhile). Before the harness removes anything, the
tests check that vmcloud itself removed what it made (``Cluster.network_leftovers``).

Needs root, RabbitMQ, PostgreSQL, dnsmasq, the test guest and (for the marker-free
systemd guest) the realistic guest (tools/guest/build-realistic-guest.sh). Guests boot
under TCG: at most 6 run at once.
"""
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys

from vmcloud import exception
from vmcloud.network import probe
from tests import base
from tests import guest
from tests.multihost import netns
from tests.multihost import test_cluster

DEPLOY_TIMEOUT = 600
# The marker-free systemd guest, from a 2 GiB root file system fetched on demand.
REALISTIC_TIMEOUT = 480
WAIT = 240.0
PROBE_TIMEOUT = 3.0
SUBNET = ipaddress.ip_network('10.200.0.0/24')
# The first deployment's four instances (lowest free first, from .2).
FIRST = [str(SUBNET.network_address + i) for i in range(2, 6)]
# The second deployment's guests and the client host claim these in the first's subnet.
STRANGER = str(SUBNET.network_address + 50)
CLIENT = str(SUBNET.network_address + 100)
# Reach rounds: each takes a few seconds (2 s per target that does not answer), so the
# probes run on through the second deployment's life.
REACH_TRIES = 150
REACH = re.compile(r'^VMCLOUD-REACH (\S+):(\d+) (yes|no)(?: (.*?))?\r?$', re.MULTILINE)
STRAY_VNI = 4242


def reaches(console: str) -> list[tuple[str, bool, str]]:
    """The guest's reach probes in order: (address, answered, first line of the body)."""
    return [(m.group(1), m.group(3) == 'yes', m.group(4) or '')
            for m in REACH.finditer(console)]


class NetworkTestCase(test_cluster.CloudTestCase):
    """A cloud whose leak check also covers the network agents' DHCP namespaces."""

    def setUp(self):
        super().setUp()
        for program in ('dnsmasq', 'nsenter', 'unshare'):
            if not any(os.access(os.path.join(d, program), os.X_OK)
                       for d in os.environ.get('PATH', '').split(os.pathsep) + ['/usr/sbin']):
                self.fail(f'{program} is not installed')

    def assert_nothing_left(self) -> None:
        """CloudTestCase's check, and no DHCP namespace of this cloud's hosts (with the
        dnsmasq in it) is left; what is found is removed, so it spills into no other
        test."""
        state_dirs = [host.state_dir for host in self.cloud.computes.values()]
        left = netns.agent_namespaces(state_dirs)
        for namespace in left:
            netns.delete_namespace(namespace)
        try:
            super().assert_nothing_left()
        finally:
            self.assertEqual([], left, 'network agent namespaces left after the test')

    # -- helpers ---------------------------------------------------------------

    def console(self, instance: dict) -> str:
        """The instance's console so far ('' before qemu made it)."""
        try:
            with open(self.cloud.console_path(instance['host'], instance['name']),
                      errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def http(self, host: str, vni: int, address: str) -> tuple[int, bytes]:
        """GET / of ``address`` from the DHCP namespace of network ``vni`` on ``host``,
        as the health check does. :raises: NetworkError."""
        return probe.http_get(self.cloud.agent_namespace(host, vni), address, 80, '/',
                              PROBE_TIMEOUT)

    def wait_http(self, host: str, vni: int, instance: dict) -> bytes:
        """The instance's HTTP answer from ``host``'s side of network ``vni`` (bounded)."""
        def look():
            try:
                return self.http(host, vni, instance['address'])
            except exception.NetworkError as exc:
                return str(exc)
        answer = self.cloud.wait_for(
            f'{instance["name"]} to answer HTTP from {host}\'s namespace of VNI {vni}', look,
            lambda seen: isinstance(seen, tuple) and seen[0] == 200, WAIT, interval=1)
        self.assertEqual(instance['name'], answer[1].decode().split()[0], answer)
        return answer[1]

    def fetch(self, host: netns.Host, address: str) -> subprocess.CompletedProcess:
        return host.run([sys.executable, '-c', netns.HTTP_FETCH, f'http://{address}/',
                         str(PROBE_TIMEOUT)], check=False, timeout=PROBE_TIMEOUT + 30)

    def link(self, host: str, name: str) -> dict | None:
        done = self.cloud.computes[host].run(['ip', '-j', '-d', '-s', 'link', 'show', name],
                                             check=False)
        return json.loads(done.stdout)[0] if done.returncode == 0 else None

    def fdb_peers(self, host: str, vxlan: str) -> set[str]:
        out = self.cloud.computes[host].run(['bridge', '-j', 'fdb', 'show', 'dev', vxlan]).stdout
        return {e['dst'] for e in json.loads(out or '[]')
                if e.get('mac') == '00:00:00:00:00:00' and 'dst' in e}

    def dnsmasqs(self, host: str, network_id: str) -> list[int]:
        return [p.pid for p in self.cloud.computes[host].processes()
                if p.program == 'dnsmasq' and any(network_id in a for a in p.argv)]

    def parts(self, host: str, deployment: dict) -> list[str]:
        """What of ``deployment``'s network is on ``host``: devices, namespace, dnsmasq."""
        vni, network_id = deployment['network']['vni'], deployment['network']['id']
        found = [f'link {name}' for name in (f'vmcb{vni}', f'vmcx{vni}', f'vmcd{vni}')
                 if self.link(host, name) is not None]
        namespace = self.cloud.agent_namespace(host, vni)
        if namespace in netns.namespaces():
            found.append(f'netns {namespace}')
        found += [f'dnsmasq {pid}' for pid in self.dnsmasqs(host, network_id)]
        return found

    def deleted(self, deployment: dict) -> None:
        self.cloud.cli_json('delete', deployment['id'])
        self.cloud.wait_for(f'deployment {deployment["id"]} deleted',
                            lambda: self.cloud.deployment(deployment['id']),
                            lambda d: d['state'] == 'deleted', DEPLOY_TIMEOUT)

    def no_network_left(self, hosts) -> None:
        """vmcloud itself (not the harness) removed every part of every guest network."""
        left = self.cloud.wait_for(
            'every guest network part gone', lambda: sum(
                (self.cloud.network_leftovers(h) for h in hosts), []),
            lambda seen: not seen, 60, interval=2)
        self.assertEqual([], left)


class DeploymentNetworkTest(NetworkTestCase):

    def setUp(self):
        super().setUp()
        self.cloud.open()
        self.cloud.import_guest()
        for name in ('node1', 'node2'):
            self.cloud.start_compute(name)
        self.client = self.cloud.network.add_host('client')
        self.cloud.wait_hosts(['node1', 'node2'])

    def serve_on_client(self) -> subprocess.Popen:
        """The client host answers HTTP on an address of the first deployment's subnet,
        on its underlay link (the only link it has)."""
        self.client.run(['ip', 'addr', 'add', f'{CLIENT}/{SUBNET.prefixlen}', 'dev', 'eth0'])
        server = self.client.popen([sys.executable, '-c', netns.HTTP_SERVER, 'client',
                                    CLIENT, '80'])
        self.client.wait_for_tcp(CLIENT, 80, 30, server)
        return server

    def test_across_hosts_isolated_reconciled_and_removed(self):
        client_server = self.serve_on_client()
        boot = f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.reach_tries={REACH_TRIES}'
        first = self.cloud.deploy(
            4, f'{boot} vmcloud.reach={",".join(FIRST + [STRANGER, CLIENT])}',
            health='http:80', timeout=DEPLOY_TIMEOUT)
        self.assertEqual('active', first['state'], first)
        net = first['network']
        vni = net['vni']
        # What the guests' command line relied on.
        self.assertEqual(str(SUBNET), net['cidr'], first)
        self.assertEqual(sorted(FIRST), sorted(i['address'] for i in first['instances']), first)
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in first['instances']}, first)
        by_address = {i['address']: i for i in first['instances']}

        # Each guest answers HTTP on its address from inside its network: from its own
        # host's DHCP namespace, and from the other host's (across the VXLAN).
        for instance in first['instances']:
            for host in ('node1', 'node2'):
                self.wait_http(host, vni, instance)

        # Guest to guest, across hosts: every guest got an answer from every other,
        # from the instance at that address.
        def answered(instance):
            return {address: body for address, ok, body in reaches(self.console(instance))
                    if ok}
        for instance in first['instances']:
            got = self.cloud.wait_for(
                f'{instance["name"]} to reach every guest of its deployment',
                lambda instance=instance: answered(instance),
                lambda seen: set(FIRST) <= set(seen), WAIT)
            for address in FIRST:
                self.assertEqual(by_address[address]['name'], got[address].split()[0], got)
        # The cross-host traffic went through each host's VXLAN device, to the other's VTEP.
        vteps = {name: host.address for name, host in self.cloud.computes.items()}
        for host, other in (('node1', 'node2'), ('node2', 'node1')):
            vxlan = self.link(host, f'vmcx{vni}')
            self.assertIsNotNone(vxlan, f'{host} has no vmcx{vni}')
            info = vxlan['linkinfo']['info_data']
            self.assertEqual((vni, vteps[host]), (info['id'], info['local']), vxlan)
            self.assertEqual(f'vmcb{vni}', vxlan['master'], vxlan)
            self.assertEqual({vteps[other]}, self.fdb_peers(host, f'vmcx{vni}'))
            self.assertGreater(vxlan['stats64']['rx']['packets'], 0, vxlan)
            self.assertGreater(vxlan['stats64']['tx']['packets'], 0, vxlan)

        # A second deployment whose guests claim an address of the first's subnet.
        second = self.cloud.deploy(
            2, f'{boot} vmcloud.ip={STRANGER}/{SUBNET.prefixlen} '
               f'vmcloud.reach={",".join([STRANGER] + FIRST)}', timeout=DEPLOY_TIMEOUT)
        self.assertEqual('active', second['state'], second)
        self.assertNotEqual(vni, second['network']['vni'], second)
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in second['instances']}, second)
        offsets = {i['name']: len(reaches(self.console(i))) for i in first['instances']}

        # Stranger guests -> the first deployment: never answered, while each stranger
        # answers itself (its server is up on that address).
        def probed(instance, since=0):
            return reaches(self.console(instance))[since:]
        for stranger in second['instances']:
            seen = self.cloud.wait_for(
                f'{stranger["name"]} to probe itself and the first deployment twice',
                lambda stranger=stranger: probed(stranger),
                lambda seen: {(a, ok) for a, ok, _ in seen} >= {(STRANGER, True)} and all(
                    sum(1 for a, _, _ in seen if a == address) >= 2 for address in FIRST),
                WAIT)
            self.assertEqual([], [s for s in seen if s[0] in FIRST and s[1]], stranger)
        # The first deployment -> the strangers and the client host: never answered,
        # probed again since the strangers run.
        for instance in first['instances']:
            seen = self.cloud.wait_for(
                f'{instance["name"]} to probe the strangers and the client again',
                lambda instance=instance: probed(instance, offsets[instance['name']]),
                lambda seen: {STRANGER, CLIENT} <= {a for a, _, _ in seen}, WAIT)
            self.assertEqual([], [s for s in reaches(self.console(instance))
                                  if s[0] in (STRANGER, CLIENT) and s[1]], instance)
        # The client host -> the guests of both: nothing; its own server answers.
        self.assertEqual(0, self.fetch(self.client, CLIENT).returncode)
        for address in FIRST + [STRANGER]:
            done = self.fetch(self.client, address)
            self.assertNotEqual(0, done.returncode, f'the client host reached {address}: '
                                                    f'{done.stdout}')
        # Done with the client host: its server is no process of the cloud (problems()).
        base.stop_process(client_server, 10)

        # Deleting a deployment removes its network's parts from every host, and
        # nothing of the other's.
        self.deleted(second)
        for host in ('node1', 'node2'):
            self.assertEqual([], self.cloud.wait_for(
                f'the second network gone from {host}',
                lambda host=host: self.parts(host, second), lambda seen: not seen, 60))
            self.assertEqual(3 + 1 + 1, len(self.parts(host, first)), self.parts(host, first))

        # A compute service that was killed finds its network broken and a stray
        # network's parts; started again, it puts the one right and removes the other.
        self.cloud.kill('compute-node1')
        node1 = self.cloud.computes['node1']
        for pid in self.dnsmasqs('node1', net['id']):
            os.kill(pid, signal.SIGKILL)
        node1.run(['ip', 'link', 'del', f'vmcx{vni}'])
        stray = self.cloud.agent_namespace('node1', STRAY_VNI)
        # Marked as its agent marks what it makes (one of another agent would be left).
        node1.run(['ip', 'link', 'add', f'vmcb{STRAY_VNI}', 'type', 'bridge'])
        node1.run(['ip', 'link', 'set', f'vmcb{STRAY_VNI}', 'alias',
                   f'vmcloud:{stray.rsplit("-", 1)[1]}'])
        self.addCleanup(netns.delete_namespace, stray)
        subprocess.run(['ip', 'netns', 'add', stray], check=True, timeout=30)
        self.cloud.restart('compute-node1')
        self.cloud.wait_for(
            'node1 to put its network right', lambda: (
                self.parts('node1', first), self.link('node1', f'vmcb{STRAY_VNI}') is None,
                stray in netns.namespaces(), self.fdb_peers('node1', f'vmcx{vni}')
                if self.link('node1', f'vmcx{vni}') else set()),
            lambda seen: len(seen[0]) == 5 and seen[1] and not seen[2]
            and seen[3] == {vteps['node2']}, WAIT, interval=2)
        for instance in first['instances']:
            for host in ('node1', 'node2'):
                self.wait_http(host, vni, instance)
        self.assertEqual([], self.cloud.wait_no_problems())

        # The last deployment gone: nothing of any guest network on any host.
        self.deleted(first)
        self.no_network_left(['node1', 'node2'])


class HealthCheckTest(NetworkTestCase):
    """Images that print no VMCLOUD-PHASE marker become active by their health check."""

    def setUp(self):
        super().setUp()
        # systemd under TCG on a loaded machine may take minutes: no build expires first.
        self.cloud.options.setdefault('DEFAULT', {})['build_timeout'] = REALISTIC_TIMEOUT + 120
        self.cloud.open()
        self.cloud.import_guest()
        self.cloud.start_compute('node1')
        self.cloud.wait_hosts(['node1'])

    def import_realistic(self) -> str:
        """The realistic guest's root file system as warehouse image ``realistic``, from
        a sparse copy in the controller's state directory. :returns: its cmdline."""
        root = os.path.join(guest.GUEST_DIR, 'realistic')
        disk = guest.realistic_disk()
        with open(os.path.join(root, 'cmdline')) as f:
            cmdline = f.read().strip()
        uploads = os.path.join(self.cloud.controller.state_dir, 'uploads')
        os.makedirs(uploads, exist_ok=True)
        copy = os.path.join(uploads, 'realistic.img')
        subprocess.run(['cp', '--sparse=always', disk, copy], check=True, timeout=300)
        self.cloud.cli_json('image', 'import', copy, 'realistic', '--format', 'raw')
        return cmdline

    def test_marker_free_images_active_by_health_check(self):
        cmdline = self.import_realistic()
        # The test guest with its markers off, ready when port 80 accepts.
        quiet = self.cloud.deploy(1, f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.markers=0',
                                  health='tcp:80', health_timeout=WAIT, timeout=DEPLOY_TIMEOUT)
        # The systemd guest (networkd DHCP, busybox httpd), its marker unit off, ready when
        # GET / answers.
        systemd = self.cloud.cli_json(
            'deploy', 'realistic', '-n', '1', '--kernel', 'guest-kernel', '--initrd',
            'guest-initrd', '--cmdline', f'{cmdline} vmcloud.markers=0', '--memory', '512',
            '--health', 'http:80/',
            '--health-timeout', str(REALISTIC_TIMEOUT), '--wait', '--timeout',
            str(REALISTIC_TIMEOUT + 60), timeout=REALISTIC_TIMEOUT + 120)
        for deployment, kind in ((quiet, 'tcp'), (systemd, 'http')):
            self.assertEqual('active', deployment['state'], deployment)
            self.assertEqual(kind, deployment['health']['kind'], deployment)
            [instance] = deployment['instances']
            self.assertNotIn('VMCLOUD-PHASE', self.console(instance))
        [instance] = systemd['instances']
        self.assertEqual((200, b'vmcloud realistic guest\n'), self.http(
            'node1', systemd['network']['vni'], instance['address']))
        # The marker-free test guest got its address by DHCP from its host's dnsmasq.
        [instance] = quiet['instances']
        self.assertIn(f'VMCLOUD-NET eth0 {instance["address"]}/', self.console(instance))
        self.wait_http('node1', quiet['network']['vni'], instance)

        for deployment in (quiet, systemd):
            self.deleted(deployment)
        self.no_network_left(['node1'])
