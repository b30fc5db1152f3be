"""The dispatcher and two compute managers as separate processes on RabbitMQ and PostgreSQL.

tools/start-services.sh starts both (the README's test command runs it). Each
test gets its own RabbitMQ virtual host and its own database. One test stops and
restarts RabbitMQ and PostgreSQL, so .stestr.conf runs this module's tests on one worker.
"""
import json
import os
import signal
import subprocess
import sys
import uuid

import testtools.content

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.dispatcher import rpcapi
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import console
from vmcloud.storage import warehouse
from tests import base
from tests import guest

TIMEOUT = 180
POSTGRES_VERSION = sorted(os.listdir('/etc/postgresql'), key=int)[-1]


def admin(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


class MultiProcessTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(self.nothing_left_running)  # runs last, after the services stop
        tag = uuid.uuid4().hex[:10]
        vhost = f'vmcloud-{tag}'
        admin('rabbitmqctl', '-q', 'add_vhost', vhost)
        self.addCleanup(admin, 'rabbitmqctl', '-q', 'delete_vhost', vhost)
        self.addCleanup(rpc.cleanup)  # before the vhost goes: no reconnecting to it
        admin('rabbitmqctl', '-q', 'set_permissions', '-p', vhost, 'guest', '.*', '.*', '.*')
        self.options = {
            'DEFAULT': {'transport_url': f'rabbit://guest:guest@127.0.0.1:5672/{vhost}',
                        'heartbeat_interval': 1, 'service_down_time': 5,
                        'rpc_call_timeout': 30},
            'database': {'connection': base.postgres_database(self.addCleanup, 'vmcloud')},
            # Its compute managers' Linux network agent runs in the machine's namespace.
            'network': self.use_private_vni_range(),
        }
        self.config = self.write_config(**self.options)
        rpc.register_opts(self.conf)
        for group, values in self.options.items():
            for key, value in values.items():
                self.conf.set_override(key, value, None if group == 'DEFAULT' else group)
        warehouse.Warehouse(self.conf).import_image(guest.path('disk.img'), 'guest')
        self.api = rpcapi.DispatcherAPI(self.conf)
        self.services = {}
        self.processes = []  # every process started, restarted ones too
        self.addCleanup(self.stop_services)
        self.start('dispatcher', 'dispatcher')
        for host in ('node1', 'node2'):
            self.start(f'{host}-mirrors', 'mirror-service', node=host)
            self.start(host, 'compute', '--host', host)
        # Before the services stop (cleanups run last first): the guests outlive them.
        self.addCleanup(self.delete_everything)
        polling.wait(self.api.list_hosts, lambda hosts: len([h for h in hosts if h['up']]) == 2,
                     TIMEOUT, 'two compute hosts up')
        self.boot = {'kernel': guest.path('vmlinuz'), 'initrd': guest.path('initrd.img'),
                     'cmdline': guest.CMDLINE + ' vmcloud.id={name}'}

    def node_config(self, host: str) -> str:
        """The second config file of node ``host``: its own [mirror] and [compute] paths,
        as on a machine of its own (both nodes share this machine's state_path otherwise)."""
        root = os.path.join(self.state_path, 'nodes', host)
        path = os.path.join(self.tmp, f'{host}.conf')
        with open(path, 'w') as f:
            f.write(f'[mirror]\nmirrors_path = {root}/mirrors\ncache_path = {root}/chunk-cache\n'
                    f'nbd_socket = {root}/nbd.sock\ncontrol_socket = {root}/control.sock\n'
                    f'[compute]\ninstances_path = {root}/instances\n')
        return path

    def start(self, name: str, *args: str, node: str | None = None) -> None:
        path = os.path.join(self.tmp, f'{name}.log')
        log = open(path, 'a')  # a restarted service's log follows its predecessor's
        self.addCleanup(log.close)
        before = log.tell()  # where this start's lines begin: the predecessor said running
        self.addOnException(lambda _: self.addDetail(
            f'{name}.log', testtools.content.content_from_file(path, buffer_now=True)))
        configs = ['--config-file', self.config]
        if args[0] == 'compute' or node:
            configs += ['--config-file', self.node_config(node or name)]
        process = subprocess.Popen([sys.executable, '-m', 'vmcloud.cmd.cli', *configs, *args],
                                   stdout=log, stderr=subprocess.STDOUT)
        self.services[name] = process
        self.processes.append(process)

        # A call sent before the service's queue exists is lost and waits for its timeout.
        def started():
            with open(path) as f:
                f.seek(before)
                return process.poll() is not None or 'running\n' in f.read()
        polling.wait(started, bool, TIMEOUT, f'{name} to start')
        self.assertIsNone(process.poll(), f'{name} exited')

    def console_path(self, instance: dict) -> str:
        """Where ``instance``'s qemu writes its console, in its node's instances directory."""
        return os.path.join(self.state_path, 'nodes', instance['host'], 'instances',
                            instance['name'], 'console.log')

    def settle(self, deployment: dict) -> dict:
        return self.api.wait_deployment(deployment['id'], TIMEOUT)

    def running(self, deployment: dict) -> dict:
        deployment = self.settle(deployment)
        self.assertEqual('active', deployment['state'], deployment)
        for instance in deployment['instances']:
            console.wait_for_marker(
                self.console_path(instance), instance['name'], driver_base.APP_RUNNING, TIMEOUT,
                lambda: bool(guest.qemu_processes_named(instance['name'])))
        return deployment

    def test_deploy_8_snapshot_redeploy(self):
        first = self.running(self.api.deploy('guest', 8, boot=self.boot))
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in first['instances']})
        snapshot = self.api.snapshot(first['id'])
        snapshot = self.api.wait_snapshot(snapshot['id'], TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        names = {i['id']: i['name'] for i in first['instances']}
        origin = {item['version']: names[item['instance_id']] for item in snapshot['items']}
        self.api.delete_deployment(first['id'])
        second = self.running(self.api.deploy_snapshot(snapshot['id']))
        for instance in second['instances']:
            self.assertIn(f'VMCLOUD-PREVIOUS {origin[instance["image"]]}',
                          console.read(self.console_path(instance)))

    def test_a_compute_manager_killed_mid_deploy_and_restarted(self):
        deployment = self.api.deploy('guest', 6, boot=self.boot)
        self.services['node2'].send_signal(signal.SIGKILL)
        self.services['node2'].wait()
        self.assertIn('node2', {i['host'] for i in deployment['instances']}, deployment)
        # The guests' disks are the mirror service's: the successor adopts what the dead
        # manager left (a cut-short build is cleaned up and built again), and the build
        # requests queued meanwhile are built once.
        self.start('node2', 'compute', '--host', 'node2')
        deployment = self.running(deployment)
        for instance in deployment['instances']:
            self.assertEqual(1, len(guest.qemu_processes_named(instance['name'])), instance)
            self.assertTrue(self.served_by(instance['host'], instance['name']), instance)
        hosts = {h['name']: h['state'] for h in self.api.list_hosts()}
        self.assertEqual({'node1': 'up', 'node2': 'up'}, hosts)

    def test_a_graceful_compute_restart_keeps_the_guests(self):
        deployment = self.running(self.api.deploy('guest', 2, boot=self.boot))
        pids = {i['name']: guest.qemu_processes_named(i['name']) for i in deployment['instances']}
        for host in ('node1', 'node2'):
            base.stop_process(self.services[host])
            self.start(host, 'compute', '--host', host)
        self.wait_hosts_up('the restarts')
        # A host whose restart outlasted service_down_time was unknown, and so were its
        # instances until its first heartbeat after registering reports them running.
        deployment = polling.wait(
            lambda: self.api.show_deployment(deployment['id']),
            lambda d: [i['state'] for i in d['instances']] == ['active', 'active'],
            TIMEOUT, 'both instances active again after the restarts')
        self.assertEqual(pids, {i['name']: guest.qemu_processes_named(i['name'])
                                for i in deployment['instances']})
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'], TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)

    def served_by(self, host: str, name: str) -> bool:
        """Whether a qemu runs ``name`` on a disk served by ``host``'s compute manager
        (both nodes run on this machine: the disk's NBD socket tells them apart)."""
        socket = os.path.join(self.state_path, 'nodes', host, 'nbd.sock')
        for pid in guest.qemu_processes_named(name):
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                if socket.encode() in f.read():
                    return True
        return False

    def stop_services(self) -> None:
        for process in reversed(self.processes):
            base.stop_process(process)

    def delete_everything(self) -> None:
        """Delete every deployment and wait until its guests are gone: the guests outlive
        the services, so only a delete ends them."""
        try:
            for deployment in self.api.list_deployments():
                self.api.delete_deployment(deployment['id'])
            polling.wait(lambda: [i for d in self.api.list_deployments()
                                  for i in self.api.show_deployment(d['id'])['instances']
                                  if i['state'] != 'deleted'],
                         lambda left: not left, TIMEOUT, 'every instance deleted')
        except exception.VmcloudError as exc:  # nothing_left_running says what is left
            self.addDetail('delete_everything', testtools.content.text_content(str(exc)))

    def nothing_left_running(self) -> None:
        leftovers = guest.qemu_processes_named(self.tmp)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        self.assertEqual([], leftovers, 'guests outlived the delete of their deployments')

    def test_bad_requests_change_nothing(self):
        self.assertRaises(exception.ImageNotFound, self.api.deploy, 'nosuch', 1)
        error = self.assertRaises(exception.NoValidHost, self.api.deploy, 'guest', 500)
        self.assertIn('500', str(error))
        # Over RabbitMQ too, the error arrives with its fields.
        self.assertEqual((500, 500, 2), (error.requested, error.required, error.hosts))
        self.assertLess(error.placed, 500)
        self.assertRaises(exception.InvalidRequest, self.api.deploy, 'guest', 0)
        self.assertEqual([], self.api.list_deployments())
        cli = [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', self.config]
        result = subprocess.run(cli + ['deploy', 'nosuch', '-n', '2'], capture_output=True,
                                text=True, timeout=120)
        self.assertEqual(1, result.returncode)
        self.assertIn('image nosuch not found', result.stderr)
        bad = self.write_config(**dict(self.options, compute={'driver': 'nosuch'}))
        result = subprocess.run([sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', bad,
                                 'compute', '--host', 'node3'], capture_output=True, text=True,
                                timeout=120)
        self.assertEqual(1, result.returncode)
        self.assertIn("unknown vmcloud.drivers plugin 'nosuch'", result.stderr)

    def vmcloud(self, *args: str, config: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file',
                               config or self.config, *args], capture_output=True, text=True,
                              timeout=TIMEOUT)

    def test_the_command_line(self):
        boot = ['--kernel', self.boot['kernel'], '--initrd', self.boot['initrd'],
                '--cmdline', self.boot['cmdline']]
        result = self.vmcloud('deploy', 'guest', '-n', '2', *boot, '--wait', '-f', 'json')
        self.assertEqual(0, result.returncode, result.stderr)
        deployment = json.loads(result.stdout)
        self.assertEqual(['active', 'active'], [i['state'] for i in deployment['instances']])
        result = self.vmcloud('snapshot', deployment['id'], '--wait', '-f', 'json')
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertEqual('available', json.loads(result.stdout)['state'])
        listed = json.loads(self.vmcloud('list', '-f', 'json').stdout)
        self.assertEqual([deployment['id']], [d['id'] for d in listed])
        hosts = json.loads(self.vmcloud('host', 'list', '-f', 'json').stdout)
        self.assertEqual({'node1': 1, 'node2': 1}, {h['name']: h['instances'] for h in hosts})
        result = self.vmcloud('delete', deployment['id'], '-f', 'json')
        self.assertEqual('deleted', json.loads(result.stdout)['state'])

    def wait_hosts_up(self, after: str) -> None:
        def hosts_up():
            try:
                return all(h['up'] for h in self.api.list_hosts())
            except (exception.MessagingError, exception.DatabaseError):
                return False  # a call sent while the services reconnect may be lost
        polling.wait(hosts_up, bool, 2 * TIMEOUT, f'compute hosts up after {after}')

    def test_the_bus_and_the_database_go_away_and_come_back(self):
        admin('rabbitmqctl', '-q', 'stop_app')
        try:
            error = self.assertRaises(exception.MessagingError, self.api.list_deployments)
            self.assertIn('dispatcher', str(error))
        finally:
            admin('rabbitmqctl', '-q', 'start_app')
        self.wait_hosts_up('RabbitMQ came back')

        cluster = ['pg_ctlcluster', POSTGRES_VERSION, 'main']
        admin(*cluster, 'stop', '-m', 'fast')
        try:
            error = self.assertRaises(exception.DatabaseError, self.api.list_deployments)
            self.assertIn('cannot use the database', str(error))
        finally:
            admin(*cluster, 'start')
        self.wait_hosts_up('PostgreSQL came back')
        self.running(self.api.deploy('guest', 2, boot=self.boot))
