"""``vmcloud cloud ...``, ``vmcloud app ...`` and deploy's exposure options: what each asks
the dispatcher (the real client, over fake://, to a fake dispatcher) and prints; bad
input refused before anything is asked."""
import contextlib
import io
import json

from tests import base
from vmcloud import exception
from vmcloud import rpc
from vmcloud.cmd import cli
from vmcloud.dispatcher import rpcapi

DEPLOYMENT = {'id': 'd1', 'state': 'building', 'image': 'web:1', 'count': 2,
              'cloud': 'c1', 'application': 'web', 'port': 8080, 'protocol': 'http',
              'listener_port': 21000,
              'instances': [{'name': 'vm-1', 'host': 'node1', 'state': 'building'},
                            {'name': 'vm-2', 'host': 'node2', 'state': 'building'}]}


class FakeDispatcher:
    """The dispatcher's cloud and application endpoints, on a dict each; ``calls``: what
    was asked, with its arguments as the client sent them."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.clouds = {'default': {'name': 'default', 'connection_limit': 1000, 'hosts': []}}
        self.applications: dict[str, dict] = {}
        # show_deployment's answers, one per poll; the last one stays.
        self.shown = [dict(DEPLOYMENT), dict(DEPLOYMENT, state='active')]

    def _asked(self, method: str, **kwargs) -> None:
        self.calls.append((method, kwargs))

    def _cloud(self, name: str) -> dict:
        if name not in self.clouds:
            raise exception.CloudNotFound(name)
        return self.clouds[name]

    @rpc.expose
    def ping(self, ctxt: dict) -> dict:
        return {'host': 'here'}

    @rpc.expose
    def create_cloud(self, ctxt: dict, name: str, connection_limit: int,
                     hosts: list[str]) -> dict:
        self._asked('create_cloud', name=name, connection_limit=connection_limit,
                    hosts=hosts)
        if 'ghost' in hosts:
            raise exception.HostNotFound('ghost')
        self.clouds[name] = {'name': name, 'connection_limit': connection_limit,
                             'hosts': sorted(hosts)}
        return self.clouds[name]

    @rpc.expose
    def update_cloud(self, ctxt: dict, name: str, connection_limit: int | None,
                     add_hosts: list[str], remove_hosts: list[str]) -> dict:
        self._asked('update_cloud', name=name, connection_limit=connection_limit,
                    add_hosts=add_hosts, remove_hosts=remove_hosts)
        cloud = self._cloud(name)
        if connection_limit is not None:
            cloud['connection_limit'] = connection_limit
        cloud['hosts'] = sorted((set(cloud['hosts']) | set(add_hosts)) - set(remove_hosts))
        return cloud

    @rpc.expose
    def show_cloud(self, ctxt: dict, name: str) -> dict:
        self._asked('show_cloud', name=name)
        return self._cloud(name)

    @rpc.expose
    def list_clouds(self, ctxt: dict) -> list[dict]:
        self._asked('list_clouds')
        return list(self.clouds.values())

    @rpc.expose
    def delete_cloud(self, ctxt: dict, name: str) -> dict:
        self._asked('delete_cloud', name=name)
        if name == 'default':
            raise exception.InvalidRequest('the cloud default cannot be deleted')
        return self.clouds.pop(self._cloud(name)['name'])

    @rpc.expose
    def create_application(self, ctxt: dict, name: str, image: str, port: int,
                           protocol: str, vcpus: int, memory_mib: int, boot: dict,
                           health: dict | None, connection_limit: int | None) -> dict:
        fields = {'name': name, 'image': image, 'port': port, 'protocol': protocol,
                  'vcpus': vcpus, 'memory_mib': memory_mib, 'boot': boot, 'health': health,
                  'connection_limit': connection_limit}
        self._asked('create_application', **fields)
        self.applications[name] = fields
        return fields

    @rpc.expose
    def show_application(self, ctxt: dict, name: str) -> dict:
        self._asked('show_application', name=name)
        if name not in self.applications:
            raise exception.ApplicationNotFound(name)
        return self.applications[name]

    @rpc.expose
    def list_applications(self, ctxt: dict) -> list[dict]:
        return list(self.applications.values())

    @rpc.expose
    def delete_application(self, ctxt: dict, name: str) -> dict:
        self._asked('delete_application', name=name)
        raise exception.InvalidRequest(f'application {name} is deployed: d1')

    @rpc.expose
    def deploy_application(self, ctxt: dict, application: str, cloud: str, count: int,
                           min_count: int | None) -> dict:
        self._asked('deploy_application', application=application, cloud=cloud,
                    count=count, min_count=min_count)
        self._cloud(cloud)
        return dict(DEPLOYMENT, cloud=cloud)

    @rpc.expose
    def deploy(self, ctxt: dict, **kwargs) -> dict:
        self._asked('deploy', **kwargs)
        return dict(DEPLOYMENT, application=None, state='active')

    @rpc.expose
    def show_deployment(self, ctxt: dict, deployment_id: str) -> dict:
        self._asked('show_deployment', deployment_id=deployment_id)
        return self.shown.pop(0) if len(self.shown) > 1 else self.shown[0]


class CommandsTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(rpc.cleanup)
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('cli_timeout', 5)
        self.dispatcher = FakeDispatcher()
        server = rpc.server(self.conf, rpcapi.TOPIC, 'dispatcher', [self.dispatcher])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def json_of(self, *argv: str):
        rc, out, err = self.cli(*argv, '-f', 'json')
        self.assertEqual(0, rc, err)
        return json.loads(out)

    def refused(self, *argv: str) -> str:
        """:returns: what the command said as it exited non-zero, having asked nothing."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                self.assertRaises(SystemExit) as exited:
            cli.main(list(argv))
        self.assertEqual(2, exited.exception.code)
        self.assertEqual([], self.dispatcher.calls)
        return err.getvalue()

    def failed(self, *argv: str) -> str:
        """:returns: the one line of error the command printed as it exited 1."""
        rc, out, err = self.cli(*argv)
        self.assertEqual((1, ''), (rc, out))
        self.assertEqual(1, len(err.splitlines()), err)
        return err

    @staticmethod
    def table_rows(text: str) -> list[list[str]]:
        return [[cell.strip() for cell in line.split('|')[1:-1]]
                for line in text.splitlines() if line.startswith('|')]

    def field_values(self, text: str) -> dict[str, str]:
        """A record's table as {field: value}."""
        return {row[0]: row[1] for row in self.table_rows(text)[1:]}

    @staticmethod
    def tables(text: str) -> list[str]:
        """The tables printed one after another (one ends, the next begins: two border
        lines in a row)."""
        found: list[list[str]] = []
        previous = ''
        for line in text.splitlines():
            if not found or (line.startswith('+') and previous.startswith('+')):
                found.append([])
            found[-1].append(line)
            previous = line
        return ['\n'.join(lines) for lines in found]


class CloudCommandsTest(CommandsTest):
    def test_create_with_hosts_and_show_them(self):
        cloud = self.json_of('cloud', 'create', 'c1', '--connection-limit', '50',
                             '--host', 'node1', '--host', 'node2')
        self.assertEqual({'name': 'c1', 'connection_limit': 50, 'hosts': ['node1', 'node2']},
                         cloud)
        self.assertEqual(('create_cloud', {'name': 'c1', 'connection_limit': 50,
                                           'hosts': ['node1', 'node2']}),
                         self.dispatcher.calls[-1])
        rc, out, err = self.cli('cloud', 'show', 'c1')
        self.assertEqual(0, rc, err)
        self.assertEqual({'name': 'c1', 'connection_limit': '50', 'hosts': 'node1, node2'},
                         self.field_values(out))

    def test_list_says_every_host_for_none_listed(self):
        self.json_of('cloud', 'create', 'c1', '--connection-limit', '5', '--host', 'node1')
        rc, out, err = self.cli('cloud', 'list')
        self.assertEqual(0, rc, err)
        self.assertEqual([['name', 'connection_limit', 'hosts'],
                          ['default', '1000', '(every host)'], ['c1', '5', 'node1']],
                         self.table_rows(out))
        # JSON says it as the dispatcher does
        self.assertEqual([[], ['node1']], [c['hosts'] for c in self.json_of('cloud', 'list')])

    def test_update_sends_each_change(self):
        self.json_of('cloud', 'create', 'c1', '--connection-limit', '5', '--host', 'node1')
        cloud = self.json_of('cloud', 'update', 'c1', '--connection-limit', '7',
                             '--add-host', 'node2', '--add-host', 'node3',
                             '--remove-host', 'node1')
        self.assertEqual({'name': 'c1', 'connection_limit': 7, 'hosts': ['node2', 'node3']},
                         cloud)
        self.assertEqual(('update_cloud', {'name': 'c1', 'connection_limit': 7,
                                           'add_hosts': ['node2', 'node3'],
                                           'remove_hosts': ['node1']}),
                         self.dispatcher.calls[-1])
        self.json_of('cloud', 'update', 'c1', '--add-host', 'node4')
        self.assertEqual(('update_cloud', {'name': 'c1', 'connection_limit': None,
                                           'add_hosts': ['node4'], 'remove_hosts': []}),
                         self.dispatcher.calls[-1])

    def test_an_update_without_a_change_is_refused(self):
        self.assertIn('cloud update needs --connection-limit, --add-host or --remove-host',
                      self.refused('cloud', 'update', 'c1'))

    def test_a_connection_limit_below_one_is_refused_naming_it(self):
        for value in ('0', '-3', 'many', '1.5'):
            err = self.refused('cloud', 'create', 'c1', '--connection-limit', value)
            self.assertIn(f"argument --connection-limit: connection limit '{value}' is not "
                          'a whole number of at least 1', err)
        self.assertIn('--connection-limit', self.refused('cloud', 'create', 'c1'))

    def test_an_unknown_cloud_is_an_error_naming_it(self):
        for argv in (('cloud', 'show', 'nope'), ('cloud', 'delete', 'nope'),
                     ('cloud', 'update', 'nope', '--connection-limit', '3')):
            self.assertEqual('vmcloud: error: cloud nope not found\n', self.failed(*argv))

    def test_what_the_dispatcher_refuses_is_said_as_it_is(self):
        self.assertEqual('vmcloud: error: the cloud default cannot be deleted\n',
                         self.failed('cloud', 'delete', 'default'))
        self.assertIn('ghost', self.failed('cloud', 'create', 'c1', '--connection-limit',
                                           '5', '--host', 'ghost'))

    def test_delete_shows_what_was_deleted(self):
        self.json_of('cloud', 'create', 'c1', '--connection-limit', '5')
        self.assertEqual('c1', self.json_of('cloud', 'delete', 'c1')['name'])
        self.assertNotIn('c1', self.dispatcher.clouds)


class AppCommandsTest(CommandsTest):
    def setUp(self):
        super().setUp()
        self.dispatcher.clouds['c1'] = {'name': 'c1', 'connection_limit': 5, 'hosts': []}

    def test_create_sends_every_field(self):
        app = self.json_of('app', 'create', 'web', '--image', 'web:2', '--port', '8080',
                           '--protocol', 'http', '--vcpus', '2', '--memory', '512',
                           '--kernel', 'vmlinuz:1', '--cmdline', 'quiet',
                           '--health', 'http:8080/ready', '--health-timeout', '30',
                           '--connection-limit', '20')
        self.assertEqual({'name': 'web', 'image': 'web:2', 'port': 8080, 'protocol': 'http',
                          'vcpus': 2, 'memory_mib': 512,
                          'boot': {'kernel': 'vmlinuz:1', 'cmdline': 'quiet'},
                          'health': {'kind': 'http', 'port': 8080, 'path': '/ready',
                                     'timeout': 30.0},
                          'connection_limit': 20}, app)
        self.assertEqual(('create_application', app), self.dispatcher.calls[-1])

    def test_create_defaults_as_deploy_has_them(self):
        app = self.json_of('app', 'create', 'echo', '--image', 'echo', '--port', '7',
                           '--protocol', 'tcp')
        self.assertEqual((1, 256, {}, {'kind': 'marker'}, None),
                         (app['vcpus'], app['memory_mib'], app['boot'], app['health'],
                          app['connection_limit']))

    def test_bad_input_is_refused_naming_it(self):
        create = ('app', 'create', 'web', '--image', 'web')
        self.assertIn("argument --protocol: invalid choice: 'udp'",
                      self.refused(*create, '--port', '80', '--protocol', 'udp'))
        for port in ('0', '65536', 'http'):
            self.assertIn(f"argument --port: port '{port}' is not a number 1-65535",
                          self.refused(*create, '--port', port, '--protocol', 'tcp'))
        self.assertIn('--port', self.refused(*create, '--protocol', 'tcp'))
        self.assertIn('--protocol', self.refused(*create, '--port', '80'))
        self.assertIn("health check 'tcp:x'",
                      self.refused(*create, '--port', '80', '--protocol', 'tcp',
                                   '--health', 'tcp:x'))
        self.assertIn('--health-timeout must be above 0',
                      self.refused(*create, '--port', '80', '--protocol', 'tcp',
                                   '--health-timeout', '0'))
        self.assertIn('--min-count must be between 1 and --count',
                      self.refused('app', 'deploy', 'web', '-n', '2', '--min-count', '3'))

    def test_list_and_show(self):
        self.json_of('app', 'create', 'web', '--image', 'web', '--port', '80',
                     '--protocol', 'http')
        rc, out, err = self.cli('app', 'list')
        self.assertEqual(0, rc, err)
        self.assertEqual([['name', 'image', 'protocol', 'port', 'vcpus', 'memory_mib',
                           'connection_limit'],
                          ['web', 'web', 'http', '80', '1', '256', '(none)']],
                         self.table_rows(out))
        self.assertEqual('web', self.json_of('app', 'show', 'web')['name'])
        self.assertEqual('vmcloud: error: application nope not found\n',
                         self.failed('app', 'show', 'nope'))
        self.assertEqual('vmcloud: error: application web is deployed: d1\n',
                         self.failed('app', 'delete', 'web'))

    def test_deploy_waits_and_shows_the_listener_port(self):
        rc, out, err = self.cli('app', 'deploy', 'web', '--cloud', 'c1', '-n', '2',
                                '--min-count', '1', '--wait', '--timeout', '30')
        self.assertEqual(0, rc, err)
        self.assertEqual(('deploy_application', {'application': 'web', 'cloud': 'c1',
                                                 'count': 2, 'min_count': 1}),
                         self.dispatcher.calls[0])
        self.assertIn('show_deployment', [method for method, _ in self.dispatcher.calls])
        self.assertIn('vmcloud: deployment d1: waiting up to 30 s (`vmcloud show d1` shows '
                      'it)', err)
        record, instances = self.tables(out)
        fields = self.field_values(record)
        self.assertEqual(('active', 'c1', 'web', '21000'),
                         (fields['state'], fields['cloud'], fields['application'],
                          fields['listener_port']))
        # where clients reach it comes right after what it is
        self.assertEqual(['id', 'state', 'cloud', 'application', 'listener_port', 'protocol',
                          'port'], list(fields)[:7])
        self.assertIn('vm-2', instances)

    def test_deploy_without_waiting_and_in_the_default_cloud(self):
        deployment = self.json_of('app', 'deploy', 'web')
        self.assertEqual((21000, 'building'),
                         (deployment['listener_port'], deployment['state']))
        self.assertEqual(('deploy_application', {'application': 'web', 'cloud': 'default',
                                                 'count': 1, 'min_count': None}),
                         self.dispatcher.calls[-1])

    def test_deploy_into_an_unknown_cloud_is_an_error_naming_it(self):
        self.assertEqual('vmcloud: error: cloud nope not found\n',
                         self.failed('app', 'deploy', 'web', '--cloud', 'nope'))

    def test_a_deployment_that_fails_exits_1(self):
        self.dispatcher.shown = [dict(DEPLOYMENT, state='error')]
        rc, out, err = self.cli('app', 'deploy', 'web', '--cloud', 'c1', '--wait', '-f',
                                'json')
        self.assertEqual(1, rc, err)
        self.assertEqual('error', json.loads(out)['state'])


class DeployExposureTest(CommandsTest):
    """Plain ``vmcloud deploy`` in a cloud, exposed on a port, and ``vmcloud show``."""

    def test_cloud_port_and_protocol_reach_the_dispatcher(self):
        self.json_of('deploy', 'guest', '--cloud', 'c1', '--port', '80', '--protocol', 'http')
        method, sent = self.dispatcher.calls[-1]
        self.assertEqual(('deploy', 'c1', 80, 'http'),
                         (method, sent['cloud'], sent['port'], sent['protocol']))

    def test_without_them_the_dispatcher_chooses(self):
        self.json_of('deploy', 'guest')
        _, sent = self.dispatcher.calls[-1]
        # (the client may send the default cloud's name, or nothing)
        self.assertIn(sent.get('cloud'), (None, 'default'))
        self.assertEqual((None, None), (sent.get('port'), sent.get('protocol')))
        self.json_of('deploy', 'guest', '--cloud', 'c1')
        _, sent = self.dispatcher.calls[-1]
        self.assertEqual(('c1', None), (sent['cloud'], sent.get('port')))

    def test_port_and_protocol_go_together(self):
        for argv in (('--port', '80'), ('--protocol', 'tcp')):
            self.assertIn('--port and --protocol go together',
                          self.refused('deploy', 'guest', *argv))
        self.assertIn("port '99999' is not a number 1-65535",
                      self.refused('deploy', 'guest', '--port', '99999', '--protocol', 'tcp'))
        self.assertIn('--cloud, --port and --protocol go with IMAGE, not --from-snapshot',
                      self.refused('deploy', '--from-snapshot', 's1', '--cloud', 'c1'))

    def test_show_says_where_clients_reach_it(self):
        self.dispatcher.shown = [dict(DEPLOYMENT, state='active')]
        rc, out, err = self.cli('show', 'd1')
        self.assertEqual(0, rc, err)
        record, _ = self.tables(out)
        fields = self.field_values(record)
        self.assertEqual(('c1', 'web', '21000', 'http', '8080'),
                         (fields['cloud'], fields['application'], fields['listener_port'],
                          fields['protocol'], fields['port']))
