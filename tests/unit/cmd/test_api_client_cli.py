"""Which client a command asks (``common.client``): the REST API given its URL
(``--api-url`` or $VMCLOUD_API_URL) and credentials, else the dispatcher over the bus;
the commands over the API (httpx.MockTransport) print what they print over the bus;
``vmcloud deployment ...``."""
import argparse
import contextlib
import io
import json
import os
import socket

import fixtures
import httpx

from tests import base
from tests.unit.cmd.test_api_client import FakeApi, URL, answer, error_answer
from vmcloud import exception
from vmcloud.api import client
from vmcloud.cmd import cli
from vmcloud.cmd import cloud
from vmcloud.cmd import common

REAL_CLIENT = httpx.Client
ENV = (common.API_URL_ENV, common.TOKEN_ENV, common.USERNAME_ENV, common.PASSWORD_ENV)
DEPLOYMENT = {'id': 'd1', 'state': 'building', 'image': 'web:1', 'count': 2, 'cloud': 'c1',
              'application': 'web', 'port': 80, 'protocol': 'http', 'listener_port': 21000,
              'owner': 'admin',
              'instances': [{'name': 'vm-1', 'host': 'node1', 'state': 'building'},
                            {'name': 'vm-2', 'host': 'node2', 'state': 'building'}]}


class EnvTestCase(base.TestCase):
    """No VMCLOUD_* variable of the environment the tests run in counts."""

    def setUp(self):
        super().setUp()
        for name in ENV:
            self.useFixture(fixtures.EnvironmentVariable(name))

    def env(self, **values: str) -> None:
        for name, value in values.items():
            self.useFixture(fixtures.EnvironmentVariable(name, value))

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def refused(self, *argv: str) -> str:
        """What the parser said as it refused ``argv`` (exit status 2)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                self.assertRaises(SystemExit) as exited:
            cli.main(list(argv))
        self.assertEqual(2, exited.exception.code)
        return err.getvalue()

    def password_file(self, text: str) -> str:
        path = os.path.join(self.tmp, 'password')
        with open(path, 'w') as f:
            f.write(text)
        return path


def namespace(**values):
    return argparse.Namespace(**values)


class ChoiceTest(EnvTestCase):
    def choose(self, **args):
        return common.client(self.conf, namespace(**args), lambda conf: 'the bus')

    def test_without_a_url_the_bus(self):
        self.env(VMCLOUD_TOKEN='t', VMCLOUD_USERNAME='admin')
        self.assertEqual('the bus', self.choose(api_url=None))
        self.assertEqual('the bus', self.choose())   # a namespace of no parser of ours

    def test_the_option_or_else_the_environment(self):
        self.env(VMCLOUD_TOKEN='t')
        chosen = self.choose(api_url=URL)
        self.assertIsInstance(chosen, client.Client)
        self.assertEqual((URL, 't'), (chosen.url, chosen.session.token))
        self.env(VMCLOUD_API_URL='http://elsewhere:1')
        self.assertEqual('http://elsewhere:1', self.choose(api_url=None).url)
        self.assertEqual(URL, self.choose(api_url=URL).url)

    def test_answers_may_take_as_long_as_the_dispatchers(self):
        self.env(VMCLOUD_TOKEN='t')
        self.conf.set_override('rpc_call_timeout', 77)
        self.assertEqual(77, self.choose(api_url=URL).session.timeout)

    def test_a_username_and_its_password(self):
        self.env(VMCLOUD_USERNAME='admin', VMCLOUD_PASSWORD='from-env')
        self.assertEqual('from-env', self.choose(api_url=URL).session._password)
        path = self.password_file('from-file\nignored\n')
        chosen = self.choose(api_url=URL, api_password_file=path)
        self.assertEqual(('admin', 'from-file'), (chosen.session.username,
                                                  chosen.session._password))

    def test_missing_credentials_are_named(self):
        error = self.assertRaises(exception.ConfigError, self.choose, api_url=URL)
        self.assertEqual(f'the vmcloud API at {URL} needs credentials: $VMCLOUD_TOKEN, or '
                         '$VMCLOUD_USERNAME with $VMCLOUD_PASSWORD or --password-file',
                         str(error))
        self.env(VMCLOUD_USERNAME='bob')
        error = self.assertRaises(exception.ConfigError, self.choose, api_url=URL)
        self.assertEqual(f'user bob needs a password for the vmcloud API at {URL}: '
                         '$VMCLOUD_PASSWORD or --password-file', str(error))
        error = self.assertRaises(exception.ConfigError, self.choose, api_url=URL,
                                  api_password_file=self.password_file('\n'))
        self.assertIn('holds no password', str(error))
        self.assertRaises(OSError, self.choose, api_url=URL,
                          api_password_file=os.path.join(self.tmp, 'none'))

    def test_the_global_options_are_no_command(self):
        self.assertEqual('cloud', cli.chosen_command(['--api-url', 'cloud', 'cloud', 'list']))
        self.assertEqual('cloud', cli.chosen_command(['--password-file', 'app', 'cloud',
                                                      'list']))


class ConsoleOnlyBus:
    """The dispatcher, as the commands without a REST counterpart reach it."""

    def console(self, instance, max_bytes=65536):
        return {'instance': instance, 'host': 'node1', 'console': 'login:'}


class OverTheApiTest(EnvTestCase):
    """``--api-url`` commands, their HTTP a FakeApi's."""

    def setUp(self):
        super().setUp()
        self.api = FakeApi()
        transport = httpx.MockTransport(self.api)
        self.useFixture(fixtures.MonkeyPatch(
            'vmcloud.api.client.httpx.Client',
            lambda **kwargs: REAL_CLIENT(**{**kwargs, 'transport': transport})))
        self.env(VMCLOUD_USERNAME='admin', VMCLOUD_PASSWORD='secret-pw')
        self.route('GET', '/v1/clouds', answer(200, {'clouds': [
            {'name': 'default', 'connection_limit': 1000, 'hosts': []},
            {'name': 'c1', 'connection_limit': 5, 'hosts': ['node1']}], 'clouds_links': []}))

    def route(self, method: str, path: str, response) -> None:
        self.api.routes[(method, path)] = response

    def api_cli(self, *argv: str) -> tuple[int, str, str]:
        return self.cli('--api-url', URL, *argv)

    @staticmethod
    def table_rows(text: str) -> list[list[str]]:
        return [[cell.strip() for cell in line.split('|')[1:-1]]
                for line in text.splitlines() if line.startswith('|')]

    def test_a_list_prints_as_over_the_bus(self):
        rc, out, err = self.api_cli('cloud', 'list')
        self.assertEqual(0, rc, err)
        self.assertEqual([['name', 'connection_limit', 'hosts'],
                          ['default', '1000', '(every host)'], ['c1', '5', 'node1']],
                         self.table_rows(out))
        rc, out, err = self.api_cli('cloud', 'list', '-f', 'json')
        self.assertEqual([[], ['node1']], [c['hosts'] for c in json.loads(out)])

    def test_the_environment_names_the_api(self):
        self.env(VMCLOUD_API_URL=URL)
        rc, out, err = self.cli('cloud', 'list', '-f', 'json')
        self.assertEqual((0, ''), (rc, err))
        self.assertEqual([('GET', '/v1/clouds')], self.api.asked())

    def test_an_error_says_what_the_api_said(self):
        self.route('GET', '/v1/clouds/nope', error_answer(
            404, 'cloud nope not found', type='CloudNotFound', fields={'name': 'nope'}))
        self.assertEqual((1, '', 'vmcloud: error: cloud nope not found\n'),
                         self.api_cli('cloud', 'show', 'nope'))

    def test_a_wrong_password_is_one_line_naming_the_user_and_the_api(self):
        self.env(VMCLOUD_PASSWORD='wrong')
        self.assertEqual((1, '', f'vmcloud: error: the vmcloud API at {URL} refused the '
                                 'login of user admin: wrong user name or password\n'),
                         self.api_cli('cloud', 'list'))
        path = self.password_file('secret-pw\n')
        rc, out, err = self.cli('--api-url', URL, '--password-file', path, 'cloud', 'list')
        self.assertEqual(0, rc, err)

    def test_an_api_that_does_not_answer_is_one_line_naming_it(self):
        self.useFixture(fixtures.MonkeyPatch('vmcloud.api.client.httpx.Client', REAL_CLIENT))
        with socket.socket() as closed:
            closed.bind(('127.0.0.1', 0))
            url = f'http://127.0.0.1:{closed.getsockname()[1]}'
        rc, out, err = self.cli('--api-url', url, 'app', 'list')
        self.assertEqual((1, ''), (rc, out))
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertTrue(err.startswith(f'vmcloud: error: cannot reach the vmcloud API at '
                                       f'{url}: '), err)
        rc, out, err = self.cli('--api-url', 'localhost:8780', 'app', 'list')
        self.assertEqual((1, "vmcloud: error: bad vmcloud API URL 'localhost:8780': not "
                             'http(s)://HOST[:PORT]\n'), (rc, err))

    def test_deployment_create_of_an_application_waits_and_shows_it(self):
        self.route('POST', '/v1/deployments', answer(202, {'deployment': DEPLOYMENT}))
        self.route('GET', '/v1/deployments/d1',
                   [answer(200, {'deployment': DEPLOYMENT}),
                    answer(200, {'deployment': dict(DEPLOYMENT, state='active')})])
        rc, out, err = self.api_cli('deployment', 'create', '--application', 'web',
                                    '--cloud', 'c1', '-n', '2', '--wait', '-f', 'json')
        self.assertEqual(0, rc, err)
        self.assertEqual('active', json.loads(out)['state'])
        self.assertEqual([{'application': 'web', 'cloud': 'c1', 'count': 2}],
                         self.api.bodies('POST'))
        self.assertIn('vmcloud: deployment d1: waiting up to 600 s', err)

    def test_deploy_and_deployment_create_of_an_image_send_the_same(self):
        self.route('POST', '/v1/deployments',
                   answer(202, {'deployment': dict(DEPLOYMENT, state='active')}))
        for argv in (('deploy', 'img'), ('deployment', 'create', 'img'),
                     ('deployment', 'create', '--image', 'img')):
            rc, out, err = self.api_cli(*argv, '-n', '2', '--vcpus', '2', '--port', '80',
                                        '--protocol', 'http')
            self.assertEqual(0, rc, err)
        first, *others = self.api.bodies('POST')
        self.assertEqual({'image': 'img', 'count': 2, 'vcpus': 2, 'memory_mib': 256,
                          'boot': {}, 'cloud': 'default', 'health': {'kind': 'marker'},
                          'port': 80, 'protocol': 'http'}, first)
        self.assertEqual([first, first], others)

    def test_deleting_shows_the_deployment_even_without_its_instances(self):
        deleting = {k: v for k, v in DEPLOYMENT.items() if k != 'instances'}
        self.route('DELETE', '/v1/deployments/d1',
                   answer(202, {'deployment': dict(deleting, state='deleting')}))
        rc, out, err = self.api_cli('deployment', 'delete', 'd1')
        self.assertEqual(0, rc, err)
        self.assertIn(['state', 'deleting'], self.table_rows(out))

    def test_update_and_delete_of_a_cloud(self):
        cloud_c1 = {'name': 'c1', 'connection_limit': 7, 'hosts': []}
        self.route('PATCH', '/v1/clouds/c1', answer(200, {'cloud': cloud_c1}))
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': cloud_c1}))
        self.route('DELETE', '/v1/clouds/c1', answer(204))
        rc, out, err = self.api_cli('cloud', 'update', 'c1', '--connection-limit', '7',
                                    '-f', 'json')
        self.assertEqual((0, cloud_c1), (rc, json.loads(out)))
        rc, out, err = self.api_cli('cloud', 'delete', 'c1', '-f', 'json')
        self.assertEqual((0, cloud_c1), (rc, json.loads(out)))

    def test_the_console_has_no_rest_counterpart_and_goes_over_the_bus(self):
        self.useFixture(fixtures.MonkeyPatch('vmcloud.cmd.cloud._api',
                                             lambda conf: ConsoleOnlyBus()))
        self.assertEqual((0, 'login:\n', ''), self.api_cli('console', 'vm-1'))
        self.assertEqual([], self.api.requests)


class Bus:
    """The dispatcher's methods the deployment commands call, recording them."""

    def __init__(self):
        self.calls: list[tuple] = []

    def list_deployments(self, **filters):
        self.calls.append(('list_deployments', filters))
        return [{k: v for k, v in DEPLOYMENT.items() if k != 'instances'}]

    def show_deployment(self, deployment_id):
        self.calls.append(('show_deployment', deployment_id))
        return dict(DEPLOYMENT, id=deployment_id)

    def snapshot(self, deployment_id):
        self.calls.append(('snapshot', deployment_id))
        return {'id': 's1', 'deployment_id': deployment_id, 'state': 'available',
                'items': []}

    def deploy_snapshot(self, snapshot_id, boot, allow_partial=False):
        self.calls.append(('deploy_snapshot', snapshot_id, allow_partial))
        return dict(DEPLOYMENT, state='active')


class DeploymentCommandsTest(EnvTestCase):
    """``vmcloud deployment ...`` over the bus (a fake dispatcher)."""

    def setUp(self):
        super().setUp()
        self.bus = Bus()
        self.patch(cloud, '_api', lambda conf: self.bus)

    def test_list_passes_only_the_filters_given(self):
        rc, out, err = self.cli('deployment', 'list')
        self.assertEqual(0, rc, err)
        rc, out, err = self.cli('deployment', 'list', '--cloud', 'c1', '--owner', 'bob')
        self.assertEqual([('list_deployments', {}),
                          ('list_deployments', {'cloud': 'c1', 'owner': 'bob'})],
                         self.bus.calls)
        self.assertEqual(['id', 'image', 'count', 'state', 'created_at', 'reason'],
                         OverTheApiTest.table_rows(out)[0])

    def test_show_snapshot_and_create_from_a_snapshot(self):
        for argv in (('show', 'd1'), ('snapshot', 'd1'),
                     ('create', '--snapshot', 's1', '--partial')):
            rc, out, err = self.cli('deployment', *argv, '-f', 'json')
            self.assertEqual(0, rc, err)
        self.assertEqual([('show_deployment', 'd1'), ('snapshot', 'd1'),
                          ('deploy_snapshot', 's1', True)], self.bus.calls)

    def test_create_needs_exactly_one_source(self):
        for argv in ((), ('img', '--application', 'web'), ('--image', 'i', '--snapshot', 's')):
            self.assertIn('deployment create needs exactly one of IMAGE (or --image), '
                          '--application, --snapshot',
                          self.refused('deployment', 'create', *argv))
        self.assertIn('name the image once',
                      self.refused('deployment', 'create', 'img', '--image', 'img'))

    def test_what_goes_with_an_image_is_refused_with_an_application(self):
        self.assertIn('--vcpus, --port: the application says them; they go with IMAGE, not '
                      '--application',
                      self.refused('deployment', 'create', '--application', 'web',
                                   '--vcpus', '2', '--port', '80'))
        self.assertIn('--cloud, --port and --protocol go with IMAGE, not --snapshot',
                      self.refused('deployment', 'create', '--snapshot', 's1',
                                   '--cloud', 'c1'))
        self.assertIn('--partial goes with --snapshot',
                      self.refused('deployment', 'create', 'img', '--partial'))
        self.assertIn('--count must be at least 1',
                      self.refused('deployment', 'create', 'img', '-n', '0'))
        self.assertEqual([], self.bus.calls)
