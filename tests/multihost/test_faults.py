"""The fault matrix of issue 14 on emulated hosts (tests/multihost/cluster.py): each fault
ends in the state doc/operations.md documents, with no orphaned process on any host
(every process of every namespace scanned), no guest left paused, and no instance,
host or snapshot left in a transient state.

One cloud per class, shared by its tests (the controller takes about 10 s to start and
each guest boots under TCG): a controller (RabbitMQ, PostgreSQL, warehouse service,
dispatcher) and two compute hosts, each running ``vmcloud mirror-service`` and
``vmcloud compute`` as separate services. Every test leaves the cloud as it found it
(the shared guests active, every host up) and checks that it did.

- RunningGuestsTest: two guests, one per host, that keep writing numbered lines to
  their disks (``vmcloud.keep_writing=1``, tools/guest/init) while the faults hit:
  a 60 s link cut of a compute host and of the controller, a compute manager killed
  (-9) and restarted while guests run and during a deploy, a graceful manager restart
  (the guests' disks stay served: they keep writing through it, and a snapshot
  redeployed shows the lines from before, during and after it), the dispatcher killed
  during a deploy and during a multi-snapshot, and a multi-snapshot across both hosts
  that is one cut (every guest froze before any thawed).
- WarehouseDropTest: the warehouse unreachable by drop (packets vanish, nothing is
  refused) from both compute hosts during a deploy, on hosts that cached nothing.

The deadlines are short (cluster.DEADLINES: a host silent for 5 s is unknown, a build
gets 240 s, a freeze 20 s, a paused guest thaws itself after 15 s) so that a 60 s
fault crosses every one. Needs root, RabbitMQ, PostgreSQL and the test guest.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import time

import fixtures
import testtools.content

from tests import base
from tests import guest
from tests.multihost import cluster
from tests.multihost import netns
from tests.multihost import test_cluster

# Each test's own bound; the whole module stays well under 20 minutes on 2 cores.
TEST_TIMEOUT = 600
DEPLOY_TIMEOUT = 420
# How long states get to settle once a fault is over (reconnects, reports, reconciling).
SETTLE = 180
BLIP = 60
MEMORY_MIB = 192
CMDLINE = f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.keep_writing=1'
APP_RUNNING = r'^VMCLOUD-PHASE app-running\r?$'
WROTE = re.compile(rb'^VMCLOUD-WROTE (\d+)\r?$', re.M)
WRITE_FAILED = re.compile(rb'^VMCLOUD-WRITE-FAILED (\d+)\r?$', re.M)
KEPT = re.compile(r'^VMCLOUD-KEPT lines=(\d+) last=(\S+) (\d+) broken=(\w+)\r?$', re.M)
# What no instance, host or snapshot may be left in once a fault is over.
TRANSIENT = {'building', 'unknown', 'deleting', 'freezing', 'uploading'}
# [storage_http]: a warehouse that drops packets costs each request about
# timeout x (connect_retries + 1) s before it fails.
WAREHOUSE_CLIENT = {'timeout': 15, 'connect_retries': 1}


class FaultTestCase(base.TestCase):
    """A cloud of a controller and node1, node2, started once for the class."""

    OPTIONS: dict = {'storage_http': WAREHOUSE_CLIENT}
    cloud: cluster.Cluster

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if os.geteuid() != 0:
            raise AssertionError('tests.multihost need root (network namespaces); run '
                                 'them as root like the README\'s test command')
        cls.cloud = cluster.Cluster(rate='1gbit', options=cls.OPTIONS)
        cls.prefix = f'{netns.PREFIX}-{os.getpid()}-{cls.cloud.network.tag}-'
        try:
            cls.cloud.open()
            cls.cloud.import_guest()
            for name in ('node1', 'node2'):
                cls.cloud.start_compute(name)
            cls.cloud.wait_host_states({'node1': 'up', 'node2': 'up'})
            cls.prepare()
        except BaseException:
            cls.close_cloud()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.close_cloud()
        super().tearDownClass()

    @classmethod
    def close_cloud(cls) -> None:
        """Close the cloud, then check (and remove) that nothing of it is left.

        :raises: AssertionError naming what was left.
        """
        cls.cloud.close()
        root = os.path.join(cls.cloud.network.state_root, cls.prefix)
        left = [n for n in netns.namespaces() if n.startswith(cls.prefix)]
        stray = test_cluster.processes_naming(root)
        state = glob.glob(root + '*')
        for namespace in left:
            netns.delete_namespace(namespace)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        for path in state:
            shutil.rmtree(path, ignore_errors=True)
        if left or stray or state:
            raise AssertionError(f'left after the cloud closed: namespaces {left}, '
                                 f'processes {stray}, state directories {state}')

    @classmethod
    def prepare(cls) -> None:
        """What the class's tests share, made once the hosts are up."""

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.Timeout(TEST_TIMEOUT, gentle=True))
        self.addOnException(self.attach_logs)
        self.measured: dict[str, object] = {}
        self.addCleanup(lambda: self.addDetail('measured', testtools.content.json_content(
            self.measured)))

    def attach_logs(self, _exc_info) -> None:
        for name, path in self.cloud.logs().items():
            if os.path.exists(path):
                self.addDetail(f'{name}.log', testtools.content.content_from_file(
                    path, buffer_now=True))

    # -- the cloud as the operator sees it -----------------------------------------

    def deploy(self, count: int, wait: bool = True) -> dict:
        return self.cloud.deploy(count, CMDLINE, MEMORY_MIB, wait=wait, timeout=DEPLOY_TIMEOUT)

    def show(self, deployment_id: str) -> dict:
        return self.cloud.deployment(deployment_id)

    def wait_deployment(self, deployment_id: str, timeout: float = DEPLOY_TIMEOUT) -> dict:
        """The deployment once none of its instances is in a transient state."""
        return self.cloud.wait_for(
            f'deployment {deployment_id} to settle', lambda: self.show(deployment_id),
            lambda d: not {i['state'] for i in d['instances']} & TRANSIENT, timeout, 2)

    def delete(self, deployment_id: str) -> None:
        """Delete a deployment and wait until every host confirmed its guests gone."""
        self.cloud.cli_json('delete', deployment_id)
        deleted = self.cloud.wait_for(
            f'deployment {deployment_id} deleted', lambda: self.show(deployment_id),
            lambda d: all(i['state'] == 'deleted' for i in d['instances']), SETTLE, 2)
        self.assertEqual('deleted', deleted['state'], deleted)

    def snapshots(self, deployment_id: str) -> list[dict]:
        return self.cloud.cli_json('snapshot', 'list', '--deployment', deployment_id)

    def show_snapshot(self, snapshot_id: str) -> dict:
        return self.cloud.cli_json('snapshot', 'show', snapshot_id)

    def wait_snapshot(self, snapshot_id: str, timeout: float = SETTLE) -> dict:
        return self.cloud.wait_for(
            f'snapshot {snapshot_id} to end', lambda: self.show_snapshot(snapshot_id),
            lambda s: s['state'] not in TRANSIENT, timeout, 2)

    def running(self, deployment: dict) -> dict[str, str]:
        """Every instance active, its guest's app running; :returns: name -> host."""
        self.assertEqual('active', deployment['state'], deployment)
        for instance in deployment['instances']:
            self.assertEqual('active', instance['state'], instance)
            self.cloud.wait_console(instance['host'], instance['name'], APP_RUNNING,
                                    DEPLOY_TIMEOUT)
        return {i['name']: i['host'] for i in deployment['instances']}

    def wrote(self, host: str, name: str) -> int:
        """The last line number the guest said it wrote and fsynced (0: none yet).

        :raises: AssertionError if its disk refused a line.
        """
        try:
            with open(self.cloud.console_path(host, name), 'rb') as f:
                console = f.read()
        except FileNotFoundError:
            return 0
        failed = WRITE_FAILED.findall(console)
        self.assertEqual([], failed, f'{name} on {host}: lines its disk refused')
        numbers = WROTE.findall(console)
        return int(numbers[-1]) if numbers else 0

    def wait_writing(self, host: str, name: str, beyond: int, timeout: float = 60) -> int:
        """Wait until the guest wrote past line ``beyond``. :returns: its last line."""
        return self.cloud.wait_for(f'{name} on {host} to write past line {beyond}',
                                   lambda: self.wrote(host, name), lambda n: n > beyond,
                                   timeout, 0.5)

    def assert_settled(self) -> None:
        """Every host up, no instance or snapshot transient, nothing orphaned or paused.

        Deployments the listing shows deleted are skipped: their instances were
        checked deleted when they were."""
        self.cloud.wait_host_states({name: 'up' for name in self.cloud.computes}, SETTLE)
        for listed in self.cloud.cli_json('list'):
            if listed['state'] == 'deleted':
                continue
            shown = self.wait_deployment(listed['id'], SETTLE)
            for snapshot in self.snapshots(listed['id']):
                self.assertNotIn(snapshot['state'], TRANSIENT, snapshot)
            self.assertNotIn(shown['state'], TRANSIENT, shown)
        self.assertEqual([], self.cloud.wait_no_problems())


class RunningGuestsTest(FaultTestCase):
    """Two guests, one per compute host, writing all along; every fault spares them."""

    @classmethod
    def prepare(cls) -> None:
        cls.base = cls.cloud.deploy(2, CMDLINE, MEMORY_MIB, timeout=DEPLOY_TIMEOUT)
        cls.hosts = {i['name']: i['host'] for i in cls.base['instances']}
        if sorted(cls.hosts.values()) != ['node1', 'node2']:
            raise AssertionError(f'the 2 guests are not one per host: {cls.base}')
        cls.on = {host: name for name, host in cls.hosts.items()}
        for name, host in cls.hosts.items():
            cls.cloud.wait_console(host, name, APP_RUNNING, DEPLOY_TIMEOUT)
        cls.pids = {name: cls.cloud.guests(host)[name] for name, host in cls.hosts.items()}

    def setUp(self):
        super().setUp()
        self.written = {name: self.wait_writing(host, name, 0)
                        for name, host in self.hosts.items()}

    def assert_guests_untouched(self) -> None:
        """The shared guests active where they were, the same qemu processes (never
        restarted nor rebuilt), still writing past where the test found them."""
        shown = self.wait_deployment(self.base['id'], SETTLE)
        self.assertEqual({name: (host, 'active') for name, host in self.hosts.items()},
                         {i['name']: (i['host'], i['state']) for i in shown['instances']},
                         shown)
        for name, host in self.hosts.items():
            self.assertEqual(self.pids[name], self.cloud.guests(host).get(name), name)
            self.wait_writing(host, name, self.written[name])

    def instance_states(self, deployment_id: str) -> dict[str, str]:
        return {i['name']: i['state'] for i in self.show(deployment_id)['instances']}

    # -- the network ------------------------------------------------------------------

    def test_link_down_60_s_on_a_compute_host(self):
        cut = self.on['node1']
        with self.cloud.computes['node1'].link_down(BLIP):
            down = time.monotonic()
            # Silent, not dead: unknown, neither rebuilt nor given up on.
            self.cloud.wait_host_states({'node1': 'unknown', 'node2': 'up'}, BLIP / 2)
            self.assertEqual({cut: 'unknown', self.on['node2']: 'active'},
                             self.instance_states(self.base['id']))
            # Its guest runs on, writing to its local mirror, until the cut ends.
            self.wait_writing('node1', cut, self.written[cut])
            time.sleep(max(0.0, down + BLIP - 2 - time.monotonic()))
            during = self.wrote('node1', cut)
        # Back: reconciled against what node1 really runs, the same guest.
        back = time.monotonic()
        self.cloud.wait_host_states({'node1': 'up'}, SETTLE)
        self.measured['up again after the link came back (s)'] = round(
            time.monotonic() - back, 1)
        self.assert_guests_untouched()
        self.measured['lines the cut-off guest wrote during the cut'] = (
            during - self.written[cut])
        self.assert_settled()

    def test_link_down_60_s_on_the_dispatcher_host(self):
        with self.cloud.controller.link_down(BLIP):
            # The dispatcher hears no host: all unknown (the CLI runs on the controller).
            self.cloud.wait_host_states({'node1': 'unknown', 'node2': 'unknown'}, BLIP / 2)
            self.assertEqual({name: 'unknown' for name in self.hosts},
                             self.instance_states(self.base['id']))
            for name, host in self.hosts.items():
                self.wait_writing(host, name, self.written[name])
        back = time.monotonic()
        self.cloud.wait_host_states({'node1': 'up', 'node2': 'up'}, SETTLE)
        self.measured['up again after the link came back (s)'] = round(
            time.monotonic() - back, 1)
        self.assert_guests_untouched()
        self.assert_settled()

    # -- compute managers ---------------------------------------------------------------

    def test_compute_manager_killed_and_restarted_while_guests_run(self):
        name = self.on['node1']
        self.cloud.kill('compute-node1')
        self.cloud.wait_host_states({'node1': 'unknown'}, BLIP)
        # The mirror service serves the guest's disk: it writes on without a manager.
        at_kill = self.wait_writing('node1', name, self.written[name])
        self.wait_writing('node1', name, at_kill + 4)
        self.cloud.restart('compute-node1')
        # The new manager adopts the guest it finds: the same qemu, active again.
        self.cloud.wait_host_states({'node1': 'up'}, SETTLE)
        self.assert_guests_untouched()
        self.assert_settled()

    def test_graceful_manager_restart_keeps_guests_running_and_writing(self):
        name = self.on['node2']
        self.cloud.stop_compute('node2')
        stopped = self.wrote('node2', name)
        # No manager on node2: its guest's disk is still served, every line synced.
        during = self.wait_writing('node2', name, stopped + 4)
        self.assertEqual(self.pids[name], self.cloud.guests('node2').get(name))
        self.cloud.restart('compute-node2')
        self.cloud.wait_host_states({'node2': 'up'}, SETTLE)
        restarted = self.wrote('node2', name)
        after = self.wait_writing('node2', name, restarted + 4)
        self.assert_guests_untouched()
        self.measured['lines'] = {'at the stop': stopped, 'while stopped': during,
                                  'at the restart': restarted, 'after': after}

        # Nothing was lost: a snapshot now holds every line, 1..N unbroken, N past
        # the restart, and a guest deployed from it counts on from there.
        snapshot = self.cloud.cli_json('snapshot', 'create', self.base['id'], '--wait',
                                       '--timeout', str(SETTLE), timeout=SETTLE + 60)
        self.assertEqual('available', snapshot['state'], snapshot)
        redeployed = self.cloud.cli_json('deploy', '--from-snapshot', snapshot['id'],
                                         '--wait', '--timeout', str(DEPLOY_TIMEOUT),
                                         timeout=DEPLOY_TIMEOUT + 60)
        try:
            names = {i['id']: i['name'] for i in self.base['instances']}
            origin = {item['version']: names[item['instance_id']]
                      for item in snapshot['items']}
            for instance, host in self.running(redeployed).items():
                image = next(i['image'] for i in redeployed['instances']
                             if i['name'] == instance)
                kept = KEPT.search(self.cloud.wait_console(
                    host, instance, r'^VMCLOUD-KEPT ', DEPLOY_TIMEOUT))
                self.assertIsNotNone(kept, instance)
                lines, writer, last, broken = kept.groups()
                self.assertEqual(('no', origin[image], lines), (broken, writer, last))
                if origin[image] == name:
                    self.assertGreater(int(lines), after)
                    self.measured['lines in the snapshot'] = int(lines)
                self.wait_writing(host, instance, int(lines))
        finally:
            self.delete(redeployed['id'])
        self.assert_settled()

    def test_compute_manager_killed_during_a_deploy(self):
        deployment = self.deploy(2, wait=False)
        names = {i['name'] for i in deployment['instances']}
        # Killed once a guest of the deploy is booting on it.
        booting = self.cloud.wait_for(
            'a guest of the deploy to start', lambda: {
                host: set(self.cloud.guests(host)) & names for host in self.cloud.computes},
            lambda seen: any(seen.values()), DEPLOY_TIMEOUT, 0.2)
        victim = next(host for host, started in booting.items() if started)
        self.cloud.kill(f'compute-{victim}')
        self.cloud.wait_host_states({victim: 'unknown'}, BLIP)
        self.cloud.restart(f'compute-{victim}')
        # Adopted, or cleaned up and rebuilt: active, one guest each, no duplicate.
        settled = self.wait_deployment(deployment['id'])
        self.measured['placed'] = {i['name']: [i['host'], i.get('attempts')]
                                   for i in settled['instances']}
        self.running(settled)
        self.assert_guests_untouched()
        self.assert_settled()
        self.delete(deployment['id'])
        self.assert_settled()

    # -- the dispatcher -----------------------------------------------------------------

    def test_dispatcher_killed_during_a_deploy(self):
        deployment = self.deploy(2, wait=False)
        self.cloud.kill('dispatcher')
        # Down long enough for the builds to need it (build_wanted, their reports).
        time.sleep(5)
        self.cloud.restart('dispatcher')
        settled = self.wait_deployment(deployment['id'])
        self.running(settled)
        self.assert_guests_untouched()
        self.assert_settled()
        self.delete(deployment['id'])
        self.assert_settled()

    def test_multi_snapshot_across_2_hosts_is_one_cut(self):
        snapshot = self.cloud.cli_json('snapshot', 'create', self.base['id'], '--wait',
                                       '--timeout', str(SETTLE), timeout=SETTLE + 60)
        self.assertEqual('available', snapshot['state'], snapshot)
        items = snapshot['items']
        self.assertEqual(2, len(items), snapshot)
        last_freeze = max(item['frozen_at'] for item in items)
        first_thaw = min(item['thawed_at'] for item in items)
        # Every guest froze before any thawed: one cut across both hosts.
        self.assertLess(last_freeze, first_thaw, items)
        self.measured.update({
            'last freeze - first thaw (ms)': round((last_freeze - first_thaw) * 1000, 1),
            'pause per guest (ms)': [item['pause_ms'] for item in items]})
        self.assert_guests_untouched()
        self.assert_settled()

    def test_dispatcher_killed_during_a_multi_snapshot(self):
        # node2 cannot hear the freeze (its RabbitMQ packets dropped): node1's guest
        # froze, the dispatcher waits for node2, and dies then.
        node2 = self.cloud.computes['node2']
        frozen = self.on['node1']
        earlier = {s['id'] for s in self.snapshots(self.base['id'])}
        with node2.dropping(self.cloud.controller.address, cluster.RABBITMQ_PORT):
            request = subprocess.Popen(
                self.cloud.controller.command(self.cloud._vmcloud(
                    self.cloud.cli_config, 'snapshot', 'create', self.base['id'], '-f',
                    'json')), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                self.cloud.wait_for(f'{frozen} paused for the snapshot',
                                    lambda: self.cloud.guest_status('node1', frozen),
                                    lambda status: status == 'paused', SETTLE, 0.05)
                self.cloud.kill('dispatcher')
                paused_at = time.monotonic()
                # Nobody will thaw it: its manager does, at the pause limit.
                self.cloud.wait_for(f'{frozen} thawed by its own manager',
                                    lambda: self.cloud.guest_status('node1', frozen),
                                    lambda status: status == 'running',
                                    cluster.DEADLINES['snapshot_pause_limit'] + 30, 0.2)
                self.measured['paused after the dispatcher died (s)'] = round(
                    time.monotonic() - paused_at, 1)
            finally:
                request.kill()
                request.communicate(timeout=30)
        self.cloud.restart('dispatcher')
        # The snapshot the dispatcher never finished ends in error, with the reason.
        [snapshot] = [s for s in self.snapshots(self.base['id']) if s['id'] not in earlier]
        ended = self.wait_snapshot(snapshot['id'])
        self.assertEqual('error', ended['state'], ended)
        self.assertTrue(ended['reason'], ended)
        self.measured['snapshot'] = {'state': ended['state'], 'reason': ended['reason']}
        self.assert_guests_untouched()
        self.assert_settled()


class WarehouseDropTest(FaultTestCase):
    """The warehouse unreachable from the compute hosts by drop, on hosts that cached
    nothing yet: every request of theirs hangs until its deadline."""

    OPTIONS = {'storage_http': WAREHOUSE_CLIENT, 'scheduler': {'max_attempts': 2}}

    def test_warehouse_unreachable_by_drop_during_a_deploy(self):
        address = self.cloud.controller.address
        with (self.cloud.computes['node1'].dropping(address, cluster.WAREHOUSE_PORT),
              self.cloud.computes['node2'].dropping(address, cluster.WAREHOUSE_PORT)):
            started = time.monotonic()
            deployment = self.deploy(1, wait=False)
            ended = self.wait_deployment(deployment['id'])
            self.measured['deploy ended after (s)'] = round(time.monotonic() - started, 1)
        # Each attempt ended at its deadline, named; nothing of them is left.
        [instance] = ended['instances']
        self.assertEqual('error', instance['state'], ended)
        self.assertEqual('error', ended['state'], ended)
        self.assertTrue(instance['reason'], instance)
        self.measured['reason'] = instance['reason']
        self.assertEqual([], self.cloud.wait_no_problems())
        for name in self.cloud.computes:
            self.assertEqual({}, self.cloud.guests(name), name)
        # Reachable again: the same deploy works.
        again = self.deploy(1)
        self.running(again)
        self.assert_settled()
        self.delete(again['id'])
        self.delete(deployment['id'])
        self.assert_settled()
