"""The API's application over a stub dispatcher and a real SQLite Identity (FastAPI's
TestClient, and a real uvicorn server): request ids current in the endpoint's thread
and in the logs, security headers, error bodies of every kind, body size limits, the
OpenAPI document, the version documents."""
import http
import logging
import os
import signal
import socket
import threading
import warnings

import argon2
import fastapi
import fixtures
import httpx

from tests import base
from vmcloud import exception
from vmcloud import rpc
from vmcloud.api import app as api_app
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import errors
from vmcloud.db import api as db_api

with warnings.catch_warnings():
    # Starlette would rather its TestClient ran on httpx2; httpx does.
    warnings.simplefilter('ignore')
    from fastapi import testclient

ADMIN, ADMIN_PASSWORD = 'admin', 'admin-password'
MEMBER, MEMBER_PASSWORD = 'member', 'member-password'
# Cheap to compute: a test makes many (the API's is argon2-cffi's default).
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
REQUEST_ID = r'^req-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$'


class StubDispatcher:
    """Stands in for DispatcherAPI: ``calls`` records each call with the request id
    current in the thread that made it (what the RPC message would carry)."""

    def __init__(self):
        self.calls: list[tuple[str, str | None, dict]] = []

    def __getattr__(self, method: str):
        def call(**kwargs):
            self.calls.append((method, rpc.current_request_id(), kwargs))
            return []
        return call


class RecordedLines(logging.Handler):
    """Every record of the vmcloud loggers with the request id current where it was
    written: (logger name, request id, message)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str | None, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, rpc.current_request_id(), record.getMessage()))


class ApiTestCase(base.TestCase):
    """make_app over a stub dispatcher and a real Identity on SQLite, with an admin and
    a member; ``client`` (no token), ``admin`` and ``member`` (with theirs)."""

    def setUp(self):
        super().setUp()
        # The tracebacks of the 500s tests cause, kept off the console.
        self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/vmcloud.sqlite',
                               'database')
        self.database = db_api.Database(self.conf)
        self.database.upgrade()
        self.addCleanup(self.database.dispose)
        self.identity = auth.Identity(self.conf, self.database, hasher=FAST_HASHER)
        self.identity.create_user(ADMIN, ADMIN_PASSWORD, 'admin')
        self.identity.create_user(MEMBER, MEMBER_PASSWORD, 'member')
        self.dispatcher = StubDispatcher()
        self.services = context.Services(conf=self.conf, dispatcher=self.dispatcher,
                                         identity=self.identity, warehouse=lambda: None,
                                         monitor=None)
        self.app = api_app.make_app(self.services)
        self.client = self.make_test_client()
        self.admin = self.make_test_client(self.token(ADMIN, ADMIN_PASSWORD))
        self.member = self.make_test_client(self.token(MEMBER, MEMBER_PASSWORD))

    def make_test_client(self, token: str | None = None) -> testclient.TestClient:
        client = testclient.TestClient(self.app, raise_server_exceptions=False,
                                       headers={'X-Auth-Token': token} if token else {})
        self.addCleanup(client.close)
        return client

    def token(self, name: str, password: str) -> str:
        return self.identity.login(name, password, 'testclient')['id']

    def record_lines(self) -> RecordedLines:
        lines = RecordedLines()
        logger = logging.getLogger('vmcloud')
        logger.addHandler(lines)
        self.addCleanup(logger.removeHandler, lines)
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.DEBUG)
        return lines

    def assert_error(self, status: int, response: httpx.Response, *fragments: str) -> dict:
        """``response`` is an error of ``status`` in the API's form, its request id the
        one of its header."""
        self.assertEqual(status, response.status_code, response.text)
        body = response.json()
        self.assertEqual({'error'}, set(body), body)
        error = body['error']
        self.assertEqual({'code': status, 'title': http.HTTPStatus(status).phrase,
                          'request_id': response.headers['X-OpenStack-Request-ID']},
                         {k: error[k] for k in ('code', 'title', 'request_id')})
        self.assertTrue(error['message'])
        for fragment in fragments:
            self.assertIn(fragment, error['message'])
        return error

    def probe(self, path: str, endpoint, methods=('GET',), **kwargs) -> None:
        """Serve ``endpoint`` at ``path`` too (a route only this test has)."""
        self.app.add_api_route(path, endpoint, methods=list(methods), **kwargs)


class RequestIdTest(ApiTestCase):

    def test_the_endpoint_thread_its_rpc_calls_and_its_log_lines_have_the_request_id(self):
        lines = self.record_lines()
        seen = {}

        def endpoint(user: auth.User = fastapi.Depends(auth.current_user),
                     services: context.Services = fastapi.Depends(context.services)):
            seen['thread'] = threading.current_thread()
            seen['id'] = rpc.current_request_id()
            logging.getLogger('vmcloud.api.probe').info('probing')
            services.dispatcher.list_clouds()
            return {}
        self.probe('/v1/probe', endpoint)
        response = self.admin.get('/v1/probe')
        self.assertEqual(200, response.status_code, response.text)
        request_id = response.headers['X-OpenStack-Request-ID']
        self.assertRegex(request_id, REQUEST_ID)
        # A thread of the pool, not the event loop's nor this one.
        self.assertIsNot(threading.current_thread(), seen['thread'])
        self.assertEqual(request_id, seen['id'])
        self.assertEqual([('list_clouds', request_id, {})], self.dispatcher.calls)
        self.assertIn(('vmcloud.api.probe', request_id, 'probing'), lines.records)
        access = [r for r in lines.records if r[0] == 'vmcloud.api.access']
        self.assertEqual(1, len(access), access)
        self.assertEqual(request_id, access[0][1])
        for fragment in ('GET', '/v1/probe', ' 200 ', ' ms ', request_id, 'user admin'):
            self.assertIn(fragment, access[0][2])
        # Nothing of it stays current once answered.
        self.assertIsNone(rpc.current_request_id())

    def test_concurrent_requests_each_keep_their_own_id(self):
        both_in = threading.Barrier(2, timeout=30)
        seen = {}

        def endpoint(name: str):
            before = rpc.current_request_id()
            both_in.wait()  # the other request's id is current meanwhile, in its thread
            seen[name] = (before, rpc.current_request_id())
            return {}
        self.probe('/probe/{name}', endpoint)
        answers = {}

        def ask(name: str) -> None:
            answers[name] = self.client.get(f'/probe/{name}')
        askers = [threading.Thread(target=ask, args=(name,)) for name in ('a', 'b')]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        ids = {name: answers[name].headers['X-OpenStack-Request-ID'] for name in 'ab'}
        self.assertNotEqual(ids['a'], ids['b'])
        self.assertEqual({name: (ids[name], ids[name]) for name in 'ab'}, seen)

    def test_every_answer_has_a_new_request_id_and_errors_name_it(self):
        answers = [self.client.get('/healthz'), self.client.get('/healthz'),
                   self.client.get('/v1/users'), self.admin.get('/nosuch')]
        ids = [a.headers['X-OpenStack-Request-ID'] for a in answers]
        self.assertEqual(len(ids), len(set(ids)))
        for request_id in ids:
            self.assertRegex(request_id, REQUEST_ID)
        self.assert_error(401, answers[2])
        self.assert_error(404, answers[3])

    def test_a_request_id_sent_by_the_client_is_not_taken(self):
        response = self.client.get('/healthz', headers={
            'X-OpenStack-Request-ID': 'req-mine\nforged log line'})
        self.assertRegex(response.headers['X-OpenStack-Request-ID'], REQUEST_ID)


class HeadersTest(ApiTestCase):
    SECURITY = {
        'X-Frame-Options': 'DENY',
        'Content-Security-Policy': "default-src 'self'; frame-ancestors 'none'; "
                                   "form-action 'self'; base-uri 'none'; object-src 'none'",
        'X-Content-Type-Options': 'nosniff',
        'Referrer-Policy': 'same-origin',
    }

    def test_every_answer_refuses_framing_sniffing_and_caching(self):
        def fails():
            raise RuntimeError('a bug')
        self.probe('/v1/fails', fails)
        for response in (self.client.get('/healthz'), self.admin.get('/v1'),
                         self.client.get('/v1'), self.admin.get('/nosuch'),
                         self.admin.put('/v1'), self.admin.get('/v1/fails'),
                         self.admin.post('/v1/users', json={}),
                         self.client.post('/v1/auth/tokens', json={
                             'username': ADMIN, 'password': ADMIN_PASSWORD})):
            where = f'{response.request.method} {response.request.url}'
            for name, value in self.SECURITY.items():
                self.assertEqual(value, response.headers.get(name), where)
            self.assertEqual('no-store', response.headers.get('Cache-Control'), where)

    def test_static_files_may_be_cached(self):
        response = self.client.get('/dashboard/static/nosuch.css')
        self.assertEqual('DENY', response.headers['X-Frame-Options'])
        self.assertNotIn('Cache-Control', response.headers)


class ErrorsTest(ApiTestCase):

    def test_fastapi_own_errors_are_in_the_error_form(self):
        error = self.assert_error(404, self.admin.get('/v1/nosuchcollection'),
                                  '/v1/nosuchcollection')
        self.assertNotIn('type', error)   # no vmcloud error: a client goes by the status
        error = self.assert_error(405, self.admin.put('/v1'), 'PUT')
        self.assertIn('PUT', error['message'])
        self.assertEqual('GET', self.admin.put('/v1').headers['Allow'])
        error = self.assert_error(422, self.admin.post('/v1/users', json={
            'name': 'carol', 'password': 'long-enough', 'role': 'root'}), 'body.role')
        self.assertNotIn('long-enough', error['message'])
        self.assert_error(422, self.admin.post('/v1/users', json={
            'name': 'carol', 'password': 'long-enough', 'role': 'member', 'shell': 'sh'}),
            'body.shell')
        self.assert_error(422, self.admin.get('/v1/users', params={'limit': 'many'}),
                          'query.limit')

    def test_bad_json_is_422(self):
        for body in (b'{"name": ', b'not json', b'{"name": "x",}', b'{"name": "\xff"}'):
            self.assert_error(422, self.admin.post(
                '/v1/users', content=body, headers={'Content-Type': 'application/json'}),
                'not valid JSON')
        self.assertEqual([ADMIN, MEMBER], [u['name'] for u in self.identity.list_users()])

    def test_vmcloud_errors_have_their_status_and_message(self):
        cases = [
            (exception.CloudNotFound('c1'), 404), (exception.SnapshotNotFound('s1'), 404),
            (exception.ImageNotFound('i1'), 404), (exception.HostNotFound('h1'), 404),
            (exception.DeploymentNotFound('d1'), 404), (exception.UserNotFound('u1'), 404),
            (exception.ApplicationNotFound('a1'), 404),
            (exception.NameInUse('cloud', 'c1'), 409),
            (exception.InUse('cloud', 'default', 'cannot be deleted'), 409),
            (exception.NoValidHost(3, 3, 1, 2), 409),
            (exception.AddressPoolExhausted('no VNI left'), 409),
            (exception.ListenerPortsExhausted('http', '21000-21001'), 409),
            (exception.ImageExists('i1'), 409), (exception.VersionExists('i1', 2), 409),
            (exception.ImageInUse('i1', ['s1']), 409),
            (exception.ImageHeld('i1', 1, ['mirror']), 409),
            (exception.MarkerNotFound('m1'), 400),
            (exception.UnsafeImage('a backing file'), 422),
            (exception.CorruptManifest('bad checksum'), 422),
            (exception.InvalidName('bad name'), 422),
            (exception.InvalidRequest('count below 1'), 422),
            (exception.Unauthorized('no token'), 401),
            (exception.Forbidden('admins only'), 403),
            (exception.LoginThrottled(7), 429),
            (exception.GatewayUnavailable(['gw1'], 2), 503),
            (exception.DispatcherUnavailable('rabbit://', 'topic', 10), 503),
            (exception.MessageBusUnreachable('down'), 503),
            (exception.MessagingError('no answer'), 503),
            (exception.DatabaseError('cannot use the database'), 500),
            (exception.VmcloudError('something failed'), 500),
        ]
        raised = {}

        def endpoint(case: int):
            raise raised[case]
        self.probe('/v1/raise/{case}', endpoint)
        for case, (error, status) in enumerate(cases):
            raised[case] = error
            response = self.admin.get(f'/v1/raise/{case}')
            self.assertEqual(status, errors.status_of(error), error)
            said = self.assert_error(status, response)
            # The class and its fields: what a client raises again.
            self.assertEqual((str(error), type(error).__name__, rpc.error_fields(error)),
                             (said['message'], said['type'], said['fields']))
            if status == 401:
                self.assertEqual('Token', response.headers['WWW-Authenticate'])
            if status == 429:
                self.assertEqual('7', response.headers['Retry-After'])

    def test_an_unexpected_exception_is_a_500_naming_the_request_only(self):
        lines = self.record_lines()

        def endpoint():
            raise KeyError('secret-internal-detail')
        self.probe('/v1/bug', endpoint)
        response = self.admin.get('/v1/bug')
        request_id = response.headers['X-OpenStack-Request-ID']
        error = self.assert_error(500, response, request_id)
        self.assertNotIn('secret-internal-detail', error['message'])
        self.assertTrue([r for r in lines.records
                         if r[0] == 'vmcloud.api.app' and r[1] == request_id], lines.records)


class BodyLimitTest(ApiTestCase):

    def setUp(self):
        super().setUp()
        self.conf.set_override('max_body_bytes', 2048, 'api')
        self.conf.set_override('max_image_bytes', 8 * 1024 * 1024, 'api')
        self.read = []

        async def upload(request: fastapi.Request, name: str):
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
            self.read.append(size)
            return {'size': size}
        self.probe('/v1/probe/{name}/file', upload, methods=('PUT', 'POST'))

    def body(self, size: int) -> bytes:
        text = b'{"name": "big", "password": "long-enough", "role": "member"}'
        return text[:-1] + b' ' * (size - len(text)) + b'}'

    @staticmethod
    def chunks(data: bytes, size: int = 512):
        for offset in range(0, len(data), size):
            yield data[offset:offset + size]

    def test_over_the_limit_is_413_before_anything_is_done(self):
        json_type = {'Content-Type': 'application/json'}
        announced = self.admin.post('/v1/users', content=self.body(2049), headers=json_type)
        self.assert_error(413, announced, '2048', 'max_body_bytes')
        counted = self.admin.post('/v1/users', content=self.chunks(self.body(2049)),
                                  headers=json_type)
        self.assertNotIn('content-length', counted.request.headers)
        self.assert_error(413, counted, 'max_body_bytes')
        self.assertEqual([ADMIN, MEMBER], [u['name'] for u in self.identity.list_users()])
        # Unauthenticated: refused for its size before its token is even looked at.
        self.assert_error(413, self.client.post('/v1/users', content=self.body(4096),
                                                headers=json_type))

    def test_at_the_limit_it_is_taken_announced_or_not(self):
        json_type = {'Content-Type': 'application/json'}
        self.assertEqual(201, self.admin.post('/v1/users', content=self.body(2048),
                                              headers=json_type).status_code)
        self.admin.delete('/v1/users/big')
        self.assertEqual(201, self.admin.post('/v1/users', content=self.chunks(
            self.body(2048)), headers=json_type).status_code)

    def test_a_streamed_body_is_cut_where_it_passes_the_limit(self):
        response = self.admin.put('/v1/probe/x/file', content=self.chunks(b'x' * 4096))
        self.assert_error(413, response, 'max_body_bytes')
        self.assertEqual([], self.read)

    def test_image_uploads_have_the_image_limit(self):
        middleware = api_app.BodyLimitMiddleware(None, self.conf)
        self.assertEqual((8 * 1024 * 1024, 'max_image_bytes'),
                         middleware.limit_of('PUT', '/v1/images/web/file'))
        for method, path in (('POST', '/v1/images/web/file'), ('PUT', '/v1/images/web'),
                             ('PUT', '/v1/images/a/b/file'), ('PUT', '/v1/clouds/web/file')):
            self.assertEqual((2048, 'max_body_bytes'), middleware.limit_of(method, path))
        # Its body passes max_body_bytes, not max_image_bytes.
        client = testclient.TestClient(api_app.BodyLimitMiddleware(self.sizes, self.conf))
        self.addCleanup(client.close)
        data = b'y' * (64 * 1024)
        self.assertEqual(str(len(data)), client.put('/v1/images/web/file', content=data).text)
        self.assertEqual(413, client.put('/v1/images/web/file', content=self.chunks(
            b'z' * (8 * 1024 * 1024 + 1), 1024 * 1024)).status_code)
        refused = client.put(
            '/v1/images/web/file', headers={'Content-Length': str(8 * 1024 * 1024 + 1)},
            content=self.chunks(b'z' * 1024))
        self.assertEqual(413, refused.status_code)
        self.assertIn('max_image_bytes', refused.json()['error']['message'])
        self.assertEqual(413, client.put('/v1/images/web', content=data).status_code)

    @staticmethod
    async def sizes(scope, receive, send) -> None:
        """An ASGI app answering the size of the body it read."""
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get('body', b''))
            more = message.get('more_body', False)
        await send({'type': 'http.response.start', 'status': 200, 'headers': []})
        await send({'type': 'http.response.body', 'body': str(size).encode()})


class DocumentTest(ApiTestCase):

    def test_the_document_needs_a_token(self):
        self.assert_error(401, self.client.get('/v1/openapi.json'))
        self.assertEqual(200, self.member.get('/v1/openapi.json').status_code)

    def test_it_has_every_route_its_security_schemes_and_error_answers(self):
        document = self.admin.get('/v1/openapi.json').json()
        self.assertTrue(document['openapi'].startswith('3.'))
        self.assertEqual({'type': 'apiKey', 'in': 'header', 'name': 'X-Auth-Token'},
                         {k: v for k, v in document['components']['securitySchemes']['token']
                          .items() if k != 'description'})
        self.assertIn('ErrorBody', document['components']['schemas'])
        documented = {(method.upper(), path) for path, operations in document['paths'].items()
                      for method in operations}
        # The routes as served (FastAPI keeps an included router's routes in it).
        served = {(method, route.path)
                  for route in fastapi.routing.iter_route_contexts(self.app.routes)
                  if getattr(route, 'include_in_schema', False)
                  for method in route.methods}
        self.assertEqual(served, documented)
        for route in (('POST', '/v1/auth/tokens'), ('GET', '/v1/users'), ('GET', '/v1'),
                      ('GET', '/healthz'), ('DELETE', '/v1/users/{name}')):
            self.assertIn(route, documented)
        users = document['paths']['/v1/users']['post']
        self.assertEqual([{'token': []}, {'bearer': []}], users['security'])
        for status in ('401', '403', '404', '409', '413', '422', '429', '503'):
            self.assertEqual('#/components/schemas/ErrorBody', users['responses'][status][
                'content']['application/json']['schema']['$ref'], status)
        # The public routes do not answer 401 or 403.
        for path, method in (('/healthz', 'get'), ('/v1/auth/tokens', 'post')):
            operation = document['paths'][path][method]
            self.assertNotIn('security', operation)
            self.assertNotIn('401', operation['responses'])
            self.assertIn('422', operation['responses'])


class VersionsTest(ApiTestCase):

    def test_version_documents_need_a_token_and_health_does_not(self):
        self.assertEqual({'status': 'ok'}, self.client.get('/healthz').json())
        self.assertEqual([], self.dispatcher.calls)
        for path in ('/', '/v1'):
            self.assert_error(401, self.client.get(path))
        versions = self.member.get('/').json()['versions']
        self.assertEqual([('v1', 'CURRENT')], [(v['id'], v['status']) for v in versions])
        self.assertIn({'rel': 'self', 'href': '/v1'}, versions[0]['links'])
        self.assertEqual(versions[0], self.member.get('/v1').json()['version'])


class ServerTest(ApiTestCase):
    """A real uvicorn server: its thread pool, its port, its stop."""

    def start(self, **kwargs) -> api_app.ApiServer:
        self.conf.set_override('listen_address', '127.0.0.1', 'api')
        server = api_app.ApiServer(self.conf, self.services, **kwargs).start()
        self.addCleanup(server.stop)
        return server

    def test_it_serves_on_a_free_port_with_request_ids_in_the_pool_threads(self):
        self.identity.throttle = auth.LoginThrottle(attempts=1, window=60)
        server = self.start(port=0)
        self.assertRegex(server.url, r'^http://127\.0\.0\.1:\d+$')
        self.assertNotEqual(self.conf.api.port, int(server.url.rsplit(':', 1)[1]))
        token = self.token(MEMBER, MEMBER_PASSWORD)
        seen = []
        validate = self.identity.validate

        def validating(token: str) -> auth.User:
            seen.append((threading.current_thread(), rpc.current_request_id()))
            return validate(token)
        self.useFixture(fixtures.MockPatchObject(self.identity, 'validate',
                                                 side_effect=validating))
        with httpx.Client(base_url=server.url, headers={'X-Auth-Token': token}) as client:
            answers = [client.get('/v1/auth/tokens') for _ in range(3)]
        for response in answers:
            self.assertEqual(200, response.status_code, response.text)
            self.assertEqual(MEMBER, response.json()['token']['user']['name'])
        # Each request's id was current in the pool thread that checked its token.
        self.assertEqual([a.headers['X-OpenStack-Request-ID'] for a in answers],
                         [request_id for _, request_id in seen])
        self.assertNotIn(threading.current_thread(), [thread for thread, _ in seen])
        with httpx.Client(base_url=server.url) as client:
            # Proxies' headers are not believed: the login throttle counts the peer.
            self.assertEqual(401, client.post('/v1/auth/tokens', json={
                'username': MEMBER, 'password': 'wrong-password'},
                headers={'X-Forwarded-For': '203.0.113.9'}).status_code)
        self.assertRaises(exception.LoginThrottled, self.identity.throttle.check,
                          'someone', '127.0.0.1')
        self.identity.throttle.check('someone', '203.0.113.9')
        server.stop()
        self.assertRaises(httpx.ConnectError, httpx.get, f'{server.url}/healthz')

    def test_serve_answers_until_sigterm_then_returns(self):
        if threading.current_thread() is not threading.main_thread():
            self.skipTest('signals reach the main thread only')
        taken = socket.create_server(('127.0.0.1', 0))
        port = taken.getsockname()[1]
        taken.close()
        self.conf.set_override('port', port, 'api')
        ready = threading.Event()
        answers = []

        def ask_then_terminate() -> None:
            try:
                if ready.wait(30):
                    answers.append(httpx.get(f'http://127.0.0.1:{port}/healthz').json())
            finally:
                # serve() handles it (it was ready); without it, the default would end
                # this process: only if serve never became ready, which fails the test.
                if ready.is_set():
                    os.kill(os.getpid(), signal.SIGTERM)
        asker = threading.Thread(target=ask_then_terminate)
        asker.start()
        before = signal.getsignal(signal.SIGTERM)
        try:
            api_app.serve(self.conf, self.services, ready)
        finally:
            asker.join()
        self.assertEqual([{'status': 'ok'}], answers)
        self.assertIs(before, signal.getsignal(signal.SIGTERM))
        self.assertRaises(httpx.ConnectError, httpx.get, f'http://127.0.0.1:{port}/healthz')

    def test_a_port_in_use_is_a_configuration_error_naming_it(self):
        taken = socket.create_server(('127.0.0.1', 0))
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        error = self.assertRaises(exception.ConfigError, api_app.ApiServer(
            self.conf, self.services, port=port).start)
        self.assertIn(f'127.0.0.1:{port}', str(error))
        self.assertIn('[api] listen_address', str(error))
