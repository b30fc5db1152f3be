"""The REST API's python client over httpx.MockTransport: what it asks, how it unwraps
the answers, follows pages, logs in (again), and which VmcloudError an error answer
becomes."""
import json
import os
import socket

import fixtures
import httpx
import testtools

from vmcloud import exception
from vmcloud import rpc
from vmcloud.api import client
from vmcloud.api import errors
from vmcloud.dispatcher import states

URL = 'http://api.test:8780'
REQUEST_ID = 'req-0b6e2f4c-5d1a-4c59-9a3e-3f4b8f0f2d11'


def answer(status: int, body: dict | None = None, **headers) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers) if body is not None else \
        httpx.Response(status, headers=headers)


def error_answer(status: int, message: str, headers: dict | None = None,
                 **named) -> httpx.Response:
    """An error body; ``named``: its type and fields, if any."""
    return answer(status, {'error': {'code': status, 'title': 'x', 'message': message,
                                     'request_id': REQUEST_ID, **named}},
                  **{'X-OpenStack-Request-ID': REQUEST_ID, **(headers or {})})


class FakeApi:
    """Answers from ``routes`` {(method, path): a response, a list of them (one per
    request, the last one stays) or a callable of the request}; ``requests``: every
    request, ``logins``: the passwords each login sent."""

    TOKEN = 'token-1'

    def __init__(self):
        self.routes: dict = {}
        self.requests: list[httpx.Request] = []
        self.logins: list[str] = []
        self.tokens = iter(f'token-{n}' for n in range(1, 100))
        self.valid: set[str] = set()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if (request.method, request.url.path) == ('POST', '/v1/auth/tokens'):
            return self.login(json.loads(request.content))
        if request.headers.get('X-Auth-Token') not in self.valid:
            return error_answer(401, 'the token is unknown or expired',
                                {'WWW-Authenticate': 'Token'})
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return error_answer(404, 'Not Found')
        if callable(route):
            return route(request)
        if isinstance(route, list):
            return route.pop(0) if len(route) > 1 else route[0]
        return route

    def login(self, body: dict) -> httpx.Response:
        self.logins.append(body['password'])
        if body != {'username': 'admin', 'password': 'secret-pw'}:
            return error_answer(401, 'wrong user name or password')
        token = next(self.tokens)
        self.valid.add(token)
        return answer(201, {'token': {'id': token, 'expires_at': '2030-01-01T00:00:00',
                                      'user': {'name': 'admin', 'role': 'admin'}}},
                      **{'X-Subject-Token': token})

    def expire_tokens(self) -> None:
        self.valid.clear()

    def asked(self, method: str | None = None) -> list[tuple[str, str]]:
        """(method, path with query) of each request but the logins."""
        return [(r.method, r.url.raw_path.decode()) for r in self.requests
                if r.url.path != '/v1/auth/tokens' and method in (None, r.method)]

    def bodies(self, method: str) -> list[dict]:
        return [json.loads(r.content) for r in self.requests
                if r.method == method and r.url.path != '/v1/auth/tokens']


class ClientTestCase(testtools.TestCase):
    def setUp(self):
        super().setUp()
        self.api = FakeApi()

    def client(self, **credentials) -> client.Client:
        credentials = credentials or {'username': 'admin', 'password': 'secret-pw'}
        made = client.Client(URL, transport=httpx.MockTransport(self.api), **credentials)
        self.addCleanup(made.close)
        return made

    def route(self, method: str, path: str, response) -> None:
        self.api.routes[(method, path)] = response


class LoginTest(ClientTestCase):
    def test_it_logs_in_once_and_sends_the_token(self):
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': {'name': 'c1'}}))
        api = self.client()
        self.assertEqual([], self.api.requests)   # not before it is needed
        api.show_cloud('c1')
        api.show_cloud('c1')
        self.assertEqual(['secret-pw'], self.api.logins)
        self.assertEqual(['token-1', 'token-1'],
                         [r.headers['X-Auth-Token'] for r in self.api.requests[1:]])

    def test_an_expired_token_is_replaced_once(self):
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': {'name': 'c1'}}))
        api = self.client()
        api.show_cloud('c1')
        self.api.expire_tokens()
        self.assertEqual({'name': 'c1'}, api.show_cloud('c1'))
        self.assertEqual(2, len(self.api.logins))
        self.assertEqual('token-2', self.api.requests[-1].headers['X-Auth-Token'])

    def test_a_token_refused_right_after_a_login_is_not_retried_forever(self):
        self.route('GET', '/v1/clouds/c1', error_answer(401, 'the token is unknown or expired'))
        self.api.valid = AlwaysValid()
        api = self.client()
        api.session._token = 'given'
        error = self.assertRaises(exception.Unauthorized, api.show_cloud, 'c1')
        self.assertEqual('the token is unknown or expired', str(error))
        self.assertEqual(1, len(self.api.logins))   # one new login, then the answer stands
        self.assertEqual(2, len(self.api.asked('GET')))

    def test_a_given_token_is_used_and_its_refusal_names_the_api(self):
        self.api.valid.add('mine')
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': {'name': 'c1'}}))
        self.client(token='mine').show_cloud('c1')
        self.api.expire_tokens()
        error = self.assertRaises(exception.Unauthorized,
                                  self.client(token='mine').show_cloud, 'c1')
        self.assertEqual(f'the vmcloud API at {URL} refused the token: the token is unknown '
                         'or expired', str(error))
        self.assertEqual([], self.api.logins)

    def test_a_wrong_password_names_the_user_and_the_api(self):
        error = self.assertRaises(exception.Unauthorized,
                                  self.client(username='admin', password='nope').list_clouds)
        self.assertEqual(f'the vmcloud API at {URL} refused the login of user admin: wrong '
                         'user name or password', str(error))
        self.assertEqual(['nope'], self.api.logins)

    def test_it_needs_credentials_and_an_http_url(self):
        for kwargs in ({}, {'username': 'admin'}, {'password': 'x'}):
            error = self.assertRaises(exception.ConfigError, client.Client, URL, **kwargs)
            self.assertIn(URL, str(error))
        for url in ('api.test:8780', 'ftp://api.test', 'http://', 'http://[::1'):
            error = self.assertRaises(exception.ConfigError, client.Client, url, token='t')
            self.assertIn(f'bad vmcloud API URL {url!r}', str(error))

    def test_the_url_may_name_v1(self):
        self.assertEqual(URL, client.Client(URL + '/v1/', token='t').url)


class AlwaysValid(set):
    """Every token valid (the routes answer as they are told)."""

    def __contains__(self, token) -> bool:
        return True


class AnswersTest(ClientTestCase):
    """Each method asks its route and answers what the dispatcher's method answers."""

    def test_single_objects_are_unwrapped(self):
        cloud = {'name': 'c1', 'connection_limit': 5, 'hosts': []}
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': cloud}))
        self.route('GET', '/v1/applications/web', answer(200, {'application': {'name': 'web'}}))
        self.route('GET', '/v1/snapshots/s1', answer(200, {'snapshot': {'id': 's1'}}))
        self.route('GET', '/v1/images/img', answer(200, {'image': {'name': 'img'}}))
        api = self.client()
        self.assertEqual(cloud, api.show_cloud('c1'))
        self.assertEqual({'name': 'web'}, api.show_application('web'))
        self.assertEqual({'id': 's1'}, api.show_snapshot('s1'))
        self.assertEqual({'name': 'img'}, api.show_image('img'))

    def test_create_cloud_sends_its_body(self):
        self.route('POST', '/v1/clouds', answer(201, {'cloud': {'name': 'c1'}}))
        self.assertEqual({'name': 'c1'}, self.client().create_cloud('c1', 5, hosts=['node1']))
        self.assertEqual([{'name': 'c1', 'connection_limit': 5, 'hosts': ['node1']}],
                         self.api.bodies('POST'))

    def test_update_cloud_is_a_request_per_change(self):
        self.route('PATCH', '/v1/clouds/c1', answer(200, {'cloud': {'name': 'c1'}}))
        self.route('PUT', '/v1/clouds/c1/hosts/node2', answer(200, {'cloud': {'name': 'c1'}}))
        self.route('DELETE', '/v1/clouds/c1/hosts/node1', answer(204))
        final = {'name': 'c1', 'connection_limit': 7, 'hosts': ['node2']}
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': final}))
        self.assertEqual(final, self.client().update_cloud(
            'c1', connection_limit=7, add_hosts=['node2'], remove_hosts=['node1']))
        self.assertEqual([('PATCH', '/v1/clouds/c1'), ('PUT', '/v1/clouds/c1/hosts/node2'),
                          ('DELETE', '/v1/clouds/c1/hosts/node1'), ('GET', '/v1/clouds/c1')],
                         self.api.asked())
        self.assertEqual([{'connection_limit': 7}], self.api.bodies('PATCH'))

    def test_delete_answers_what_was_deleted(self):
        self.route('GET', '/v1/clouds/c1', answer(200, {'cloud': {'name': 'c1'}}))
        self.route('DELETE', '/v1/clouds/c1', answer(204))
        self.route('GET', '/v1/applications/web', answer(200, {'application': {'name': 'web'}}))
        self.route('DELETE', '/v1/applications/web', answer(204))
        api = self.client()
        self.assertEqual({'name': 'c1'}, api.delete_cloud('c1'))
        self.assertEqual({'name': 'web'}, api.delete_application('web'))
        self.assertEqual(2, len(self.api.asked('DELETE')))

    def test_each_kind_of_deploy_sends_its_body(self):
        self.route('POST', '/v1/deployments', answer(202, {'deployment': {'id': 'd1'}}))
        api = self.client()
        self.assertEqual({'id': 'd1'}, api.deploy('img', 2))
        api.deploy('img', 3, 2, 2, 512, {'kernel': 'k'}, health={'kind': 'tcp', 'port': 22},
                   cloud='c1', port=80, protocol='http')
        api.deploy_application('web', 'c1', 2, min_count=1)
        api.deploy_snapshot('s1', allow_partial=True)
        self.assertEqual(
            [{'image': 'img', 'count': 2, 'vcpus': 1, 'memory_mib': 256, 'boot': {},
              'cloud': 'default'},
             {'image': 'img', 'count': 3, 'min_count': 2, 'vcpus': 2, 'memory_mib': 512,
              'boot': {'kernel': 'k'}, 'health': {'kind': 'tcp', 'port': 22}, 'cloud': 'c1',
              'port': 80, 'protocol': 'http'},
             {'application': 'web', 'cloud': 'c1', 'count': 2, 'min_count': 1},
             {'snapshot': 's1', 'allow_partial': True}],
            self.api.bodies('POST'))

    def test_create_and_update_an_application(self):
        self.route('POST', '/v1/applications', answer(201, {'application': {'name': 'web'}}))
        self.route('PATCH', '/v1/applications/web', answer(200, {'application': {'port': 81}}))
        api = self.client()
        api.create_application('web', 'img', 80, 'http', connection_limit=9)
        self.assertEqual({'port': 81}, api.update_application('web', {'port': 81,
                                                                      'connection_limit': None}))
        self.assertEqual([{'name': 'web', 'image': 'img', 'port': 80, 'protocol': 'http',
                           'vcpus': 1, 'memory_mib': 256, 'boot': {}, 'health': None,
                           'connection_limit': 9}], self.api.bodies('POST'))
        self.assertEqual([{'port': 81, 'connection_limit': None}], self.api.bodies('PATCH'))

    def test_names_are_one_path_segment(self):
        self.route('GET', '/v1/deployments/a/b', answer(200, {'deployment': {}}))
        self.client().show_deployment('a/b')
        self.assertEqual([('GET', '/v1/deployments/a%2Fb')], self.api.asked())

    def test_wait_deployment_polls_until_nothing_builds(self):
        building = {'id': 'd1', 'state': states.BUILDING, 'instances': []}
        self.route('GET', '/v1/deployments/d1',
                   [answer(200, {'deployment': building})] * 2
                   + [answer(200, {'deployment': dict(building, state='active')})])
        seen = []
        done = self.client().wait_deployment('d1', 30, seen.append)
        self.assertEqual('active', done['state'])
        self.assertEqual([states.BUILDING, states.BUILDING, 'active'],
                         [d['state'] for d in seen])

    def test_wait_gives_up_after_its_timeout(self):
        self.route('GET', '/v1/snapshots/s1',
                   answer(200, {'snapshot': {'id': 's1', 'state': states.UPLOADING}}))
        error = self.assertRaises(exception.WaitTimedOut, self.client().wait_snapshot, 's1', 0)
        self.assertIn('snapshot s1', str(error))

    def test_fence_a_host(self):
        fenced = {'host': 'node1', 'state': 'fenced', 'rebuilt': ['vm-1'], 'failed': []}
        self.route('POST', '/v1/hosts/node1/fence', answer(200, {'fence': fenced}))
        self.assertEqual(fenced, self.client().fence_host('node1'))

    def test_snapshot_of_a_deployment(self):
        self.route('POST', '/v1/deployments/d1/snapshots',
                   answer(202, {'snapshot': {'id': 's1', 'state': 'uploading'}}))
        self.assertEqual('s1', self.client().snapshot('d1')['id'])

    def test_upload_streams_the_file_with_its_length(self):
        path = os.path.join(self.useFixture(fixtures.TempDir()).path, 'disk.raw')
        data = os.urandom(3 * client.UPLOAD_CHUNK + 5)
        with open(path, 'wb') as f:
            f.write(data)
        received = []

        def store(request: httpx.Request) -> httpx.Response:
            received.append((request.headers['Content-Length'], request.read(),
                             request.url.params['format']))
            return answer(201, {'image': {'name': 'img', 'version': 1}})
        self.route('PUT', '/v1/images/img/file', store)
        self.assertEqual({'name': 'img', 'version': 1},
                         self.client().upload_image('img', path, 'qcow2'))
        (length, body, fmt), = received
        self.assertEqual((str(len(data)), 'qcow2'), (length, fmt))
        self.assertTrue(body == data, 'the bytes differ')

    def test_monitoring(self):
        live = {'sampled_at': 'now', 'clouds': [], 'instances': {}, 'deployments': {},
                'gateway': 'ok'}
        self.route('GET', '/v1/monitoring', answer(200, live))
        self.route('GET', '/v1/monitoring/connections',
                   lambda r: answer(200, {'connections': [dict(r.url.params)]}))
        api = self.client()
        self.assertEqual(live, api.monitoring())
        self.assertEqual([{'cloud': 'c1'}], api.connections('c1'))
        self.assertEqual([{}], api.connections())


class PagesTest(ClientTestCase):
    def paged(self, collection: str, items: list[dict], key: str, size: int):
        """A route answering ``items`` in pages of ``size``, after ?marker=."""
        def page(request: httpx.Request) -> httpx.Response:
            params = dict(request.url.params)
            start = 0
            if 'marker' in params:
                start = [i[key] for i in items].index(params['marker']) + 1
            limit = int(params.get('limit', size))
            shown = items[start:start + min(limit, size)]
            links = []
            if start + len(shown) < len(items):
                query = dict(params, limit=str(min(limit, size)), marker=shown[-1][key])
                links = [{'rel': 'next', 'href': str(httpx.URL(
                    f'/v1/{collection}', params=query))}]
            return answer(200, {collection: shown, f'{collection}_links': links})
        return page

    def test_a_list_is_every_page(self):
        clouds = [{'name': f'c{n:02}'} for n in range(7)]
        self.route('GET', '/v1/clouds', self.paged('clouds', clouds, 'name', 3))
        self.assertEqual(clouds, self.client().list_clouds())
        self.assertEqual(['/v1/clouds', '/v1/clouds?limit=3&marker=c02',
                          '/v1/clouds?limit=3&marker=c05'], [p for _, p in self.api.asked()])

    def test_the_filters_go_along_to_every_page(self):
        deployments = [{'id': f'd{n}'} for n in range(5)]
        self.route('GET', '/v1/deployments', self.paged('deployments', deployments, 'id', 2))
        self.assertEqual(deployments, self.client().list_deployments(cloud='c1', owner='bob'))
        for _, path in self.api.asked():
            self.assertIn('cloud=c1', path)
            self.assertIn('owner=bob', path)

    def test_a_limit_and_a_marker(self):
        hosts = [{'name': f'node{n}'} for n in range(9)]
        self.route('GET', '/v1/hosts', self.paged('hosts', hosts, 'name', 3))
        self.assertEqual(hosts[2:7], self.client().list_hosts(limit=5, marker='node1'))

    def test_snapshots_of_a_deployment(self):
        self.route('GET', '/v1/snapshots', lambda r: answer(200, {
            'snapshots': [dict(r.url.params)], 'snapshots_links': []}))
        self.assertEqual([{'deployment': 'd1'}], self.client().list_snapshots('d1'))

    def test_a_next_link_that_comes_round_again_ends_it(self):
        self.route('GET', '/v1/clouds', answer(200, {
            'clouds': [{'name': 'a'}],
            'clouds_links': [{'rel': 'next', 'href': '/v1/clouds?marker=a'}]}))
        error = self.assertRaises(exception.ApiError, self.client().list_clouds)
        self.assertIn('/v1/clouds?marker=a', str(error))


# One of each error the API answers with a class of its own: the client raises the
# same class, fields and message.
RAISED = (
    exception.CloudNotFound('c1'), exception.ApplicationNotFound('web-2'),
    exception.DeploymentNotFound('8d0c9f5e-1'), exception.SnapshotNotFound('5f1d'),
    exception.HostNotFound('node1'), exception.ImageNotFound('img'),
    exception.ImageNotFound('img', 3), exception.MarkerNotFound('c9'),
    exception.UserNotFound('carol'),
    exception.NameInUse('cloud', 'c1'), exception.NameInUse('application', 'web'),
    exception.InUse('cloud', 'default', 'cannot be deleted: plain deploys use it'),
    exception.InUse('application', 'web', 'is deployed: d1, d2; delete those deployments '
                                          'first'),
    exception.ImageExists('img'), exception.VersionExists('img', 2),
    exception.ImageInUse('img:1', ['s1', 's2']), exception.ImageInUse('image img', ['s1']),
    exception.ImageHeld('img', 1, ['mirror vm-1', 'snapshot s1']),
    exception.ImageHeld('img', None, ['mirror vm-1']),
    exception.NoValidHost(3, 2, 1, 4, 'RamFilter', 3),
    exception.ListenerPortsExhausted('tcp', '22000-22099'),
    exception.AddressPoolExhausted('no free VNI left in 1000..1001: all 2 are in use'),
    exception.UnsafeImage('refusing image /tmp/x: its size changed'),
    exception.CorruptManifest('manifest img:1 is corrupt: bad checksum'),
    exception.InvalidName('bad image name'), exception.InvalidRequest('count below 1'),
    exception.GatewayUnavailable(['gw1'], 5), exception.DispatcherUnavailable(
        'rabbit://', 'vmcloud-dispatcher', 10),
    exception.MessagingError('the dispatcher did not answer deploy in time'),
    exception.DatabaseError('cannot use the database'),
    exception.Unauthorized('the token is unknown or expired'),
    exception.Forbidden('user bob is a member: this needs the admin role'),
    exception.LoginThrottled(7),
)


class ErrorsTest(ClientTestCase):
    def raised(self, response: httpx.Response) -> exception.VmcloudError:
        self.route('GET', '/v1/clouds/c1', response)
        self.api.valid = AlwaysValid()
        return self.assertRaises(exception.VmcloudError,
                                 self.client(token='t').show_cloud, 'c1')

    def test_each_class_the_api_answers_is_raised_again(self):
        # The body the API makes (errors.body, at errors.status_of's status), as it
        # comes: the class, its fields and its message again.
        for original in RAISED:
            status = errors.status_of(original)
            body = errors.body(status, str(original), REQUEST_ID, original)
            if status == 401:
                # The session's refusal of a token names the API first (tested above).
                said = body['error']
                error = client.error_of(status, said['message'], said['request_id'],
                                        type_name=said['type'], fields=said['fields'])
            else:
                error = self.raised(answer(status, body))
            self.assertIs(type(original), type(error), str(original))
            self.assertEqual(str(original), str(error))
            self.assertEqual((status, REQUEST_ID), (error.status, error.request_id))
            for name, value in rpc.error_fields(original).items():
                self.assertEqual(value, getattr(error, name), f'{original!r}: {name}')

    def test_the_type_decides_not_the_message(self):
        # A message any class could make: the class is the body's type.
        error = self.raised(error_answer(404, 'cloud c1 not found', type='ImageNotFound',
                                         fields={'image': 'c1', 'version': None}))
        self.assertEqual((exception.ImageNotFound, 'cloud c1 not found', 'c1'),
                         (type(error), str(error), error.image))

    def test_a_type_of_no_vmcloud_error_is_the_status_alone(self):
        for name in ('KeyError', 'os', 'VmcloudError', 'NoSuchError', '', 42):
            error = self.raised(error_answer(409, 'cloud c1 exists already', type=name,
                                             fields={'kind': 'cloud', 'name': 'c1'}))
            self.assertIs(exception.InvalidRequest, type(error), name)
            error = self.raised(error_answer(500, 'something broke', type=name))
            self.assertIs(exception.ApiError, type(error), name)
        error = self.raised(error_answer(404, 'cloud c1 not found', type='CloudNotFound',
                                         fields='not a dict'))
        self.assertEqual((exception.CloudNotFound, 'cloud c1 not found'),
                         (type(error), str(error)))

    def test_an_error_answer_is_read_from_its_body_and_headers(self):
        error = self.raised(error_answer(404, 'cloud c1 not found', type='CloudNotFound',
                                         fields={'name': 'c1'}))
        self.assertEqual((exception.CloudNotFound, 'c1', REQUEST_ID),
                         (type(error), error.name, error.request_id))
        # No type (an older API): the status and Retry-After.
        error = self.raised(error_answer(429, 'too many failed logins: try again in 9 s',
                                         headers={'Retry-After': '9'}))
        self.assertEqual((exception.LoginThrottled, 9), (type(error), error.retry_after))

    def test_another_message_is_the_class_its_status_stands_for(self):
        for status, cls in ((400, exception.InvalidRequest), (409, exception.InvalidRequest),
                            (422, exception.InvalidRequest), (403, exception.Forbidden)):
            error = self.raised(error_answer(status, 'body.count: must be at most 1000'))
            self.assertIs(cls, type(error))
            self.assertEqual('body.count: must be at most 1000', str(error))

    def test_anything_else_is_an_api_error_saying_its_status_and_request(self):
        for status in (404, 413, 500, 503):
            error = self.raised(error_answer(status, 'something broke'))
            self.assertIs(exception.ApiError, type(error))
            self.assertEqual((status, REQUEST_ID), (error.status, error.request_id))
            self.assertEqual(f'something broke (HTTP {status}, request {REQUEST_ID})',
                             str(error))

    def test_an_answer_not_from_the_api_says_what_answered(self):
        error = self.raised(httpx.Response(502, text='<html>Bad Gateway</html>'))
        self.assertIs(exception.ApiError, type(error))
        self.assertEqual(f'502 Bad Gateway from {URL}/v1/clouds/c1: <html>Bad Gateway</html> '
                         '(HTTP 502)', str(error))

    def test_an_api_that_cannot_be_reached_is_named(self):
        with socket.socket() as closed:
            closed.bind(('127.0.0.1', 0))
            port = closed.getsockname()[1]
        url = f'http://127.0.0.1:{port}'
        error = self.assertRaises(client.ApiUnreachable,
                                  client.Client(url, token='t').list_clouds)
        self.assertEqual(0, error.status)
        self.assertTrue(str(error).startswith(f'cannot reach the vmcloud API at {url}: '),
                        str(error))
        self.assertIsInstance(error, exception.ApiError)

    def test_no_answer_in_time_is_said_so(self):
        def hang(request):
            raise httpx.ReadTimeout('timed out', request=request)
        api = client.Client(URL, token='t', timeout=2, transport=httpx.MockTransport(hang))
        error = self.assertRaises(client.ApiUnreachable, api.list_clouds)
        self.assertEqual(f'cannot reach the vmcloud API at {URL}: no answer within 2 s '
                         '(ReadTimeout)', str(error))
