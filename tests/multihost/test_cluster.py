"""The README flow on emulated hosts that share no directory (tests/multihost/cluster.py).

What runs where (every host a network namespace with its own state directory, its link
shaped to 1 Gbit/s both ways): the controller host runs its own RabbitMQ, its own
PostgreSQL, ``vmcloud warehouse`` (file backend), ``vmcloud dispatcher`` and every CLI
command; compute hosts node1 and node2 run ``vmcloud mirror-service`` and ``vmcloud
compute`` (qemu, the warehouse over HTTP) and the 8 guests. The guests' disk, kernel and
initrd are warehouse images imported through the service, so no compute config or
request names a path outside its host. After the snapshot the first deployment is
deleted (each host confirms its guests gone), node1 and node2 power off, and two fresh
compute hosts (node3, node4: empty state, never ran anything) redeploy it: every
redeployed guest runs on a host that never ran it and reads the file its origin wrote.
The test then checks that no directory is shared (Cluster.sharing) and that what the
compute hosts fetched and uploaded crossed the controller's link (its byte counters),
their only way out.

ProcessesTest and HarnessTest check the harness itself (what counts as an orphan, a
paused guest, a service killed and restarted), without guests.

Needs root (network namespaces), RabbitMQ and PostgreSQL installed (not running: the
controller starts its own) and the test guest (tools/guest/build-test-guest.sh).
"""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import fixtures
import testtools.content

from vmcloud.conf import compute as conf_compute
from vmcloud.conf import mirror as conf_mirror
from tests import base
from tests import guest
from tests.multihost import cluster
from tests.multihost import netns

# The whole flow takes a few minutes on 2 loaded cores: 16 TCG boots dominate.
TEST_TIMEOUT = 1200
DEPLOY_TIMEOUT = 600
GUESTS = 8
APP_RUNNING = r'^VMCLOUD-PHASE app-running\r?$'


def processes_naming(text: str) -> list[int]:
    """PIDs of processes whose command line or environment contains ``text`` (epmd,
    which RabbitMQ daemonizes, names its host only in the HOME it inherited)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        for leaf in ('cmdline', 'environ'):
            try:
                with open(f'/proc/{pid}/{leaf}', 'rb') as f:
                    if text.encode() in f.read():
                        pids.append(int(pid))
                        break
            except OSError:
                continue
    return pids


def state_path_options(opts: list) -> set[str]:
    """The names of ``opts`` whose default is a path under ``$state_path``."""
    return {opt.name for opt in opts
            if isinstance(opt.default, str) and opt.default.startswith('$state_path')}


class CloudTestCase(base.TestCase):
    """Root, a bounded run, a cloud closed after the test, and nothing of it left."""

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.fail('tests.multihost need root (network namespaces); run them as root '
                      'like the README\'s test command')
        self.useFixture(fixtures.Timeout(TEST_TIMEOUT, gentle=True))
        self.cloud = cluster.Cluster(rate='1gbit')
        # Every namespace and state directory of this cloud starts with it.
        self.prefix = f'{netns.PREFIX}-{os.getpid()}-{self.cloud.network.tag}-'
        self.addCleanup(self.assert_nothing_left)  # runs last
        self.addCleanup(self.cloud.close)
        self.addOnException(self.attach_logs)

    def attach_logs(self, _exc_info) -> None:
        for name, path in self.cloud.logs().items():
            if not os.path.exists(path):  # a cloud closed by a failed __enter__
                continue
            self.addDetail(f'{name}.log', testtools.content.content_from_file(
                path, buffer_now=True))

    def assert_nothing_left(self) -> None:
        """No namespace, process (qemu included) or state directory of the cloud is left."""
        root = os.path.join(self.cloud.network.state_root, self.prefix)
        left = [n for n in netns.namespaces() if n.startswith(self.prefix)]
        stray = processes_naming(root)
        state = glob.glob(root + '*')
        for namespace in left:  # so one failure does not spill into the next test
            netns.delete_namespace(namespace)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        for path in state:
            shutil.rmtree(path, ignore_errors=True)
        self.assertEqual([], left, 'namespaces left after the test')
        self.assertEqual([], stray, 'processes left after the test')
        self.assertEqual([], state, 'state directories left after the test')


class ClusterTest(CloudTestCase):
    # The boot artifacts as the deploy request names them, and as the dispatcher pins them.
    kernel, initrd = 'guest-kernel', 'guest-initrd'
    pinned = ('guest-kernel:1', 'guest-initrd:1')

    def setUp(self):
        super().setUp()
        self.measured: dict[str, float] = {}
        self.started = time.monotonic()
        self.cloud.open()
        self.mark('controller started (s)')

    def mark(self, what: str) -> None:
        """Seconds since the last mark, kept as a detail of the test (not checked)."""
        now = time.monotonic()
        self.measured[what] = round(now - self.started, 1)
        self.started = now

    def import_images(self) -> int:
        """The guest's disk, kernel and initrd imported through the warehouse service by
        the controller's CLI, from copies in the controller's state directory.

        :returns: the bytes of kernel and initrd (each compute host fetches them).
        """
        for name, imported in self.cloud.import_guest().items():
            self.assertEqual(f'{name}:1', f'{imported["image"]}:{imported["version"]}',
                             imported)
        return sum(os.path.getsize(guest.path(cluster.GUEST_IMAGES[name]))
                   for name in ('guest-kernel', 'guest-initrd'))

    def running(self, deployment: dict) -> dict:
        """Every instance active and its guest's app running; :returns: name -> console."""
        self.assertEqual('active', deployment['state'], deployment)
        consoles = {}
        for instance in deployment['instances']:
            self.assertEqual('active', instance['state'], instance)
            consoles[instance['name']] = self.cloud.wait_console(
                instance['host'], instance['name'], APP_RUNNING, DEPLOY_TIMEOUT)
        return consoles

    def assert_only_their_link(self, hosts: list[str], running: list[str]) -> None:
        """A compute host has loopback and its link (one that runs guests also its guest
        networks' devices, none with an address), and no route but the subnet's; one that
        runs talks TCP only to the controller's RabbitMQ and warehouse service."""
        controller = self.cloud.controller.address
        for name in running:
            peers = self.cloud.peers(name)
            self.assertIn((controller, cluster.RABBITMQ_PORT), peers, name)
            self.assertLessEqual(peers, {(controller, cluster.RABBITMQ_PORT),
                                         (controller, cluster.WAREHOUSE_PORT)}, name)
        for name in hosts:
            host = self.cloud.computes[name]
            devices = host.run(['ip', '-o', 'link', 'show']).stdout
            names = sorted(line.split(':')[1].strip().split('@')[0]
                           for line in devices.splitlines())
            if name in running:
                names = [n for n in names if not cluster.NETWORK_DEVICE.match(n)]
            self.assertEqual(['eth0', 'lo'], names, name)
            self.assertEqual([f'{self.cloud.network.subnet} dev eth0'], [
                ' '.join(line.split()[:3]) for line in
                host.run(['ip', 'route', 'show']).stdout.splitlines()])

    def test_deploy_8_snapshot_delete_redeploy_on_other_hosts(self):
        artifact_bytes = self.import_images()
        for name in ('node1', 'node2'):
            self.cloud.start_compute(name)
        self.cloud.wait_hosts(['node1', 'node2'])
        before = self.cloud.controller.counters()
        self.mark('images imported, node1 and node2 up (s)')

        boot = ['--kernel', self.kernel, '--initrd', self.initrd,
                '--cmdline', guest.CMDLINE + ' vmcloud.id={name}']
        first = self.cloud.cli_json('deploy', 'guest', '-n', str(GUESTS), *boot, '--wait',
                                    '--timeout', str(DEPLOY_TIMEOUT),
                                    timeout=DEPLOY_TIMEOUT + 60)
        ran_on = {i['name']: i['host'] for i in first['instances']}
        self.assertEqual({'node1', 'node2'}, set(ran_on.values()), first)
        self.running(first)
        # The request names warehouse images, pinned, not paths on the hosts.
        self.assertEqual(self.pinned, (first['boot']['kernel'], first['boot']['initrd']),
                         first['boot'])
        self.mark('8 guests deployed and running (s)')

        # Each guest wrote its name to its /guest-wrote.txt (tools/guest/init) before
        # app-running; the snapshot takes it.
        snapshot = self.cloud.cli_json('snapshot', first['id'], '--wait', '--timeout',
                                       str(DEPLOY_TIMEOUT), timeout=DEPLOY_TIMEOUT + 60)
        self.assertEqual('available', snapshot['state'], snapshot)
        names = {i['id']: i['name'] for i in first['instances']}
        origin = {item['version']: names[item['instance_id']] for item in snapshot['items']}
        self.assertEqual(GUESTS, len(origin), snapshot)
        self.cloud.cli_json('delete', first['id'])
        # Deleted once each host confirmed its guests gone.
        self.cloud.wait_for(f'deployment {first["id"]} deleted',
                            lambda: self.cloud.deployment(first['id']),
                            lambda d: d['state'] == 'deleted', DEPLOY_TIMEOUT)
        self.assertEqual({}, self.cloud.guests('node1'))
        self.assertEqual({}, self.cloud.guests('node2'))
        self.mark('snapshot of 8 available, deployment deleted (s)')

        # Other hosts: node1 and node2 power off, two hosts with empty state take
        # over, so no redeployed guest can be where it ran.
        for name in ('node1', 'node2'):
            self.cloud.stop_node(name)
        for name in ('node3', 'node4'):
            host = self.cloud.add_compute(name)
            self.assertEqual(['vmcloud.conf'], os.listdir(host.state_dir))
            self.cloud.start_compute(name)
        self.cloud.wait_hosts(['node3', 'node4'], down=['node1', 'node2'])
        self.mark('node1 and node2 down, node3 and node4 up (s)')

        second = self.cloud.cli_json('deploy', '--from-snapshot', snapshot['id'], '--wait',
                                     '--timeout', str(DEPLOY_TIMEOUT),
                                     timeout=DEPLOY_TIMEOUT + 60)
        self.assertEqual({'node3', 'node4'}, {i['host'] for i in second['instances']},
                         second)
        consoles = self.running(second)
        for instance in second['instances']:
            self.assertNotEqual(ran_on[origin[instance['image']]], instance['host'], instance)
            # The guest found the file its origin wrote on another host.
            self.assertIn(f'VMCLOUD-PREVIOUS {origin[instance["image"]]}',
                          consoles[instance['name']])
        self.mark('8 guests redeployed and running (s)')

        # Everything the compute hosts fetched or uploaded crossed the controller's link.
        after = self.cloud.controller.counters()
        fetched = {}
        for instance in first['instances'] + self.cloud.cli_json(
                'show', second['id'])['instances']:
            host = ran_on.get(instance['name'], instance['host'])
            fetched[host] = max(fetched.get(host, 0), instance['fetched_bytes'])
        self.assertEqual({'node1', 'node2', 'node3', 'node4'}, set(fetched))
        self.assertTrue(all(fetched.values()), fetched)
        least = sum(fetched.values()) + len(fetched) * artifact_bytes
        sent = after['tx_bytes'] - before['tx_bytes']
        self.assertGreaterEqual(sent, least)
        uploaded = sum(item['uploaded_bytes'] for item in snapshot['items'])
        self.assertGreater(uploaded, 0, snapshot)
        received = after['rx_bytes'] - before['rx_bytes']
        self.assertGreaterEqual(received, uploaded)
        self.measured.update({'controller sent (bytes)': sent,
                              'fetched by the computes, at least (bytes)': least,
                              'controller received (bytes)': received,
                              'snapshot uploaded (bytes)': uploaded})
        for name, host in self.cloud.computes.items():
            self.assertGreaterEqual(host.counters()['rx_bytes'],
                                    fetched[name] + artifact_bytes, name)
        self.assert_only_their_link(list(self.cloud.computes), ['node3', 'node4'])

        self.assertEqual(5, len(self.cloud.hosts()))
        self.assertEqual([], self.cloud.sharing())
        self.addDetail('measured', testtools.content.json_content(self.measured))
        self.addDetail('configs', testtools.content.text_content('\n'.join(
            f'# {path}\n{open(path).read()}' for paths in self.cloud.configs.values()
            for path in paths)))


class ControllerTest(CloudTestCase):
    """The controller's servers, as another host reaches them over the links (one test:
    the controller takes about 10 s to start)."""

    def test_another_host_reaches_the_controllers_servers_with_the_clouds_logins(self):
        self.cloud.open()
        node = self.cloud.add_compute('node1')

        def python(code: str, *args: str) -> subprocess.CompletedProcess:
            return node.run([sys.executable, '-c', code, *args], timeout=120, check=False)

        login = ('import sys, kombu\n'
                 'c = kombu.Connection(sys.argv[1], connect_timeout=10)\n'
                 'try:\n'
                 '    c.connect(); print("in")\n'
                 'except Exception as exc:\n'
                 '    print(type(exc).__name__)\n')
        address = f'{self.cloud.controller.address}:{cluster.RABBITMQ_PORT}'
        url = self.cloud.transport_url.replace('rabbit:', 'amqp:')
        self.assertEqual('in', python(login, url).stdout.strip())
        # Not the machine's broker: its guest account does not exist here.
        self.assertNotEqual('in', python(login, f'amqp://guest:guest@{address}/').stdout.strip())

        database = (f'postgresql://{cluster.USER}:{self.cloud.password}@'
                    f'{self.cloud.controller.address}:{cluster.POSTGRES_PORT}/{cluster.USER}')
        query = ('import sys, psycopg\n'
                 'print(psycopg.connect(sys.argv[1]).execute("select current_user")'
                 '.fetchone()[0])\n')
        self.assertEqual('vmcloud', python(query, database).stdout.strip())
        self.assertIn('password authentication failed', python(
            query, database.replace(self.cloud.password, 'wrong')).stderr)

        images = f'{self.cloud.warehouse_url}/v1/images'
        curl = ['curl', '-s', '-o', '/dev/null', '-w', '%{http_code}', '--max-time', '30']
        self.assertEqual('200', node.run(
            curl + ['-H', f'Authorization: Bearer {self.cloud.token}', images]).stdout)
        self.assertEqual('401', node.run(curl + [images]).stdout)

        self.assertEqual([], self.cloud.cli_json('hosts'))
        self.assertEqual([], self.cloud.cli_json('image', 'list'))


class HarnessTest(CloudTestCase):
    """The cluster harness's own checks, on hosts whose services are not started."""

    def hosts(self, *computes: str) -> None:
        self.cloud.network.open()
        self.cloud.controller = self.cloud.network.add_host('ctl')
        for name in computes:
            self.cloud.add_compute(name)

    def test_hosts_share_nothing_until_a_config_names_another_host(self):
        self.hosts('node1', 'node2')
        self.assertEqual([], self.cloud.sharing())
        node1, node2 = self.cloud.computes['node1'], self.cloud.computes['node2']
        with open(self.cloud.configs['node2'][0], 'a') as f:
            f.write(f'[storage_file]\npath = {node1.state_dir}/warehouse\n')
        self.assertIn(f"node2's config {self.cloud.configs['node2'][0]} names node1's "
                      f"{node1.state_dir}", self.cloud.sharing())
        self.assertIn(node2.state_dir, self.cloud.configs['node2'][0])

    def test_a_path_outside_the_hosts_directory_is_shared(self):
        self.hosts('node1')
        config = self.cloud.configs['node1'][0]
        shared = os.path.join(self.cloud.network.state_root, 'shared-cache')
        with open(config, 'a') as f:
            f.write(f'[mirror]\ncache_path = {shared}\n')
        self.assertEqual([f"node1's config {config} names {shared}, outside its state "
                          'directory'], self.cloud.sharing())

    def test_a_state_directory_inside_another_is_shared(self):
        self.hosts('node1')
        node1 = self.cloud.computes['node1']
        node1.state_dir = os.path.join(self.cloud.controller.state_dir, 'node1')
        problems = self.cloud.sharing()
        self.assertIn(f"node1's {node1.state_dir} is inside ctl's", problems)
        # Its config stayed where it was: outside the directory the host now has.
        self.assertIn(f"node1's config {self.cloud.configs['node1'][0]} is outside its "
                      'state directory', problems)

    def test_a_compute_config_names_only_its_own_paths(self):
        self.hosts('node1')
        node1 = self.cloud.computes['node1']
        with open(self.cloud.configs['node1'][0]) as f:
            text = f.read()
        paths = [line.split(' = ', 1)[1] for line in text.splitlines()
                 if ' = /' in line]
        # Every [mirror] and [compute] path this checkout has, and state_path.
        self.assertGreaterEqual(len(paths), 6, text)
        # A path option added later must be placed too, or its default puts it
        # wherever state_path is.
        placed = {group: set(options) for group, options in cluster.HOST_PATHS.items()}
        self.assertEqual({'mirror': state_path_options(conf_mirror.mirror_opts),
                          'compute': state_path_options(conf_compute.compute_opts)}, placed)
        for options in cluster.HOST_PATHS.values():
            for option, leaf in options.items():
                self.assertIn(f'{option} = {node1.state_dir}/{leaf}\n', text)
        for path in paths:
            self.assertTrue(path.startswith(node1.state_dir + '/') or path == node1.state_dir,
                            path)
        self.assertIn(f'transport_url = {self.cloud.transport_url}', text)
        self.assertIn(f'url = {self.cloud.warehouse_url}', text)

    def test_a_service_that_exits_is_named_with_its_log(self):
        self.hosts()
        error = self.assertRaises(cluster.ClusterError, self.cloud.start_service, 'broken',
                                  self.cloud.controller,
                                  ['sh', '-c', 'echo cannot bind; exit 3'], 'ready', 30)
        self.assertIn('ctl: broken exited (3) while waiting for broken to start', str(error))
        self.assertIn('cannot bind', str(error))

    def test_a_service_that_never_gets_ready_is_a_bounded_wait(self):
        self.hosts()
        error = self.assertRaises(cluster.ClusterError, self.cloud.start_service, 'slow',
                                  self.cloud.controller,
                                  ['sh', '-c', 'echo starting; exec sleep 60'], 'ready', 1)
        self.assertIn('ctl: waited 1 s for slow to start', str(error))
        self.assertIn('starting', str(error))

    def test_a_state_root_postgres_cannot_reach_is_named(self):
        private = os.path.join(self.tmp, 'private')
        os.makedirs(private, mode=0o700)
        self.cloud = cluster.Cluster(state_root=private)
        self.prefix = f'{netns.PREFIX}-{os.getpid()}-{self.cloud.network.tag}-'
        self.addCleanup(self.cloud.close)
        self.hosts()
        error = self.assertRaises(cluster.ClusterError, self.cloud.start_postgres)
        self.assertIn(f'user postgres cannot reach {self.cloud.controller.state_dir}/postgres',
                      str(error))

    def test_a_failed_start_leaves_nothing(self):
        # RabbitMQ starts, then PostgreSQL cannot: everything started so far goes.
        self.useFixture(fixtures.MonkeyPatch('tests.multihost.cluster.POSTGRES_ROOT',
                                             os.path.join(self.tmp, 'nowhere')))
        error = self.assertRaises(cluster.ClusterError, self.cloud.__enter__)
        self.assertIn('no PostgreSQL server under', str(error))
        self.assertEqual({}, self.cloud.services)
        self.assertEqual([], [n for n in netns.namespaces() if n.startswith(self.prefix)])


# A stand-in for a guest's qemu: named as qemu is (argv[0], -name), answering QMP
# query-status on its monitor socket with the status it is given.
FAKE_QEMU = '''
import json, os, socket, sys
path, status = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(path), exist_ok=True)
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen()
while True:
    conn, _ = server.accept()
    stream = conn.makefile('rwb')
    stream.write(b'{"QMP": {"version": {}, "capabilities": []}}\\n')
    stream.flush()
    for line in stream:
        command = json.loads(line)['execute']
        reply = {}
        if command == 'query-status':
            reply = {'status': status, 'running': status == 'running'}
        stream.write(json.dumps({'event': 'NOISE'}).encode() + b'\\n')
        stream.write(json.dumps({'return': reply}).encode() + b'\\n')
        stream.flush()
    conn.close()
'''


# Python named qemu-system-x86_64 cannot find its library from its name.
QEMU_ENV = dict(os.environ, PYTHONHOME=sys.base_prefix)


def qemu_named(code: str, *args: str) -> list[str]:
    """Python running ``code`` with ``args``, its argv[0] qemu's."""
    return ['bash', '-c', 'exec -a qemu-system-x86_64 "$0" "$@"', sys.executable, '-c', code,
            *args]


class ProcessesTest(CloudTestCase):
    """What ``Cluster.problems`` finds: services and their children are accounted for,
    anything else in a host is an orphan, a guest must be wanted, alone and running;
    services killed and restarted."""

    hosts = HarnessTest.hosts

    def fake_guest(self, host: str, name: str, status: str) -> subprocess.Popen:
        node = self.cloud.computes[host]
        monitor = os.path.join(node.state_dir, cluster.HOST_PATHS['compute']['instances_path'],
                               name, 'qmp.sock')
        process = node.popen(qemu_named(FAKE_QEMU, monitor, status, '-name', name),
                             env=QEMU_ENV)
        deadline = time.monotonic() + 30
        while not os.path.exists(monitor):
            self.assertIsNone(process.poll(), 'the fake qemu exited')
            self.assertLess(time.monotonic(), deadline, 'the fake qemu has no monitor')
            time.sleep(0.05)
        return process

    def test_services_and_what_they_started_are_no_orphans(self):
        self.hosts('node1')
        self.cloud.start_service('svc', self.cloud.computes['node1'], [
            'sh', '-c', 'sleep 300 & echo ready; wait'], 'ready', 30)
        self.assertEqual([], self.cloud.problems({'node1': set()}))
        stray = self.cloud.computes['node1'].popen(['sleep', '301'])
        self.assertEqual([f'node1: orphaned process {stray.pid} sleep 301'],
                         self.cloud.problems({'node1': set()}))

    def test_a_killed_service_leaves_what_it_started_in_other_sessions(self):
        self.hosts('node1')
        self.cloud.start_service('svc', self.cloud.computes['node1'], [
            'sh', '-c', 'setsid sleep 302 & sleep 303 & echo ready; wait'], 'ready', 30)
        self.cloud.kill('svc')
        self.assertNotIn('svc', self.cloud.services)
        self.cloud.wait_for('the killed group gone',
                            lambda: [p.argv for p in self.cloud.computes['node1'].processes()],
                            lambda argvs: ('sleep', '303') not in argvs, 10, 0.1)
        [left] = [p for p in self.cloud.computes['node1'].processes()
                  if p.argv == ('sleep', '302')]
        self.assertEqual([f'node1: orphaned process {left.pid} sleep 302'],
                         self.cloud.problems({}))

    def test_restart_starts_it_again_as_it_was_its_log_appended(self):
        self.hosts()
        marker = os.path.join(self.tmp, 'runs')
        argv = ['sh', '-c', f'echo run >> {marker}; echo ready; exec sleep 300']
        first = self.cloud.start_service('svc', self.cloud.controller, argv, 'ready', 30)
        self.assertRaises(cluster.ClusterError, self.cloud.restart, 'svc')
        self.cloud.kill('svc')
        self.assertIsNotNone(first.process.poll())
        second = self.cloud.restart('svc')
        self.assertNotEqual(first.process.pid, second.process.pid)
        self.assertIsNone(second.process.poll())
        with open(marker) as f:
            self.assertEqual('run\nrun\n', f.read())
        with open(second.log) as f:
            self.assertEqual('ready\n\n--- harness: svc started again ---\nready\n', f.read())
        self.cloud.stop('svc')
        self.assertIsNotNone(second.process.poll())

    def test_a_restart_is_ready_only_when_the_new_run_says_so(self):
        self.hosts()
        self.cloud.start_service('svc', self.cloud.controller,
                                 ['sh', '-c', 'echo ready; exec sleep 300'], 'ready', 30)
        self.cloud.kill('svc')
        self.cloud.starts['svc'].argv = ['sh', '-c', 'echo starting; exec sleep 300']
        self.cloud.starts['svc'].timeout = 1
        error = self.assertRaises(cluster.ClusterError, self.cloud.restart, 'svc')
        self.assertIn('waited 1 s for svc to start', str(error))

    def test_a_guest_must_be_wanted_alone_and_running(self):
        self.hosts('node1', 'node2')
        qemu = self.fake_guest('node1', 'vm-a', 'running')
        self.assertEqual({'vm-a': [qemu.pid]}, self.cloud.guests('node1'))
        self.assertEqual('running', self.cloud.guest_status('node1', 'vm-a'))
        self.assertEqual([], self.cloud.problems({'node1': {'vm-a'}}))
        # Wanted elsewhere: here it is an orphan, there it is missing.
        self.assertEqual([f'node1: orphaned guest vm-a (qemu [{qemu.pid}])',
                          'node2: vm-a is wanted there but no qemu runs it'],
                         self.cloud.problems({'node2': {'vm-a'}}))
        self.fake_guest('node2', 'vm-b', 'paused')
        self.assertEqual(['node2: guest vm-b is paused'],
                         self.cloud.problems({'node1': {'vm-a'}, 'node2': {'vm-b'}}))

    def test_a_monitor_that_does_not_answer_is_named(self):
        self.hosts('node1')
        node = self.cloud.computes['node1']
        node.popen(qemu_named('import time; time.sleep(304)', '-name', 'vm-c'), env=QEMU_ENV)
        self.cloud.wait_for('the fake qemu', lambda: self.cloud.guests('node1'),
                            lambda guests: 'vm-c' in guests, 10, 0.1)
        problems = self.cloud.problems({'node1': {'vm-c'}})
        self.assertEqual(1, len(problems), problems)
        self.assertIn('node1: the monitor of vm-c', problems[0])
        self.assertIn('did not answer query-status', problems[0])
