"""Who may do what, and what the API refuses to read: every route of the OpenAPI
document needs a token (and every route is in the document), members are refused every
admin-only route and other users' deployments, logins are throttled, passwords are argon2
hashes, the dashboard refuses forged forms and framing, bodies are size-limited and
validated before anything is done."""
import http
import re
import socket
import urllib.parse

import argon2
import httpx
from fastapi import routing as fastapi_routing

from vmcloud.db import api as db_api
from tests.functional.api import base
from tests.functional.api import helpers

# What answers without a token (the dashboard's login page and static files are not
# in the document).
PUBLIC = {('GET', '/healthz'), ('POST', '/v1/auth/tokens')}
# Everything a member may not do; a member may do every other route of the document
# (path parameters written {}).
ADMIN_ONLY = {
    ('GET', '/v1/users'), ('POST', '/v1/users'),
    ('GET', '/v1/users/{}'), ('PATCH', '/v1/users/{}'), ('DELETE', '/v1/users/{}'),
    ('POST', '/v1/clouds'), ('PATCH', '/v1/clouds/{}'), ('DELETE', '/v1/clouds/{}'),
    ('PUT', '/v1/clouds/{}/hosts/{}'), ('DELETE', '/v1/clouds/{}/hosts/{}'),
    ('POST', '/v1/hosts/{}/fence'),
    ('POST', '/v1/applications'), ('PATCH', '/v1/applications/{}'),
    ('DELETE', '/v1/applications/{}'),
    ('POST', '/v1/deployments/{}/snapshots'),
    ('PUT', '/v1/images/{}/file'),
}
# Not called with the class's clients: it would revoke their tokens (see UsersAndTokensTest).
REVOKES_THE_TOKEN = ('DELETE', '/v1/auth/tokens')
SECURITY_HEADERS = {
    'X-Frame-Options': 'DENY',
    'Content-Security-Policy': "default-src 'self'; frame-ancestors 'none'; form-action "
                               "'self'; base-uri 'none'; object-src 'none'",
    'X-Content-Type-Options': 'nosniff',
    'Referrer-Policy': 'same-origin',
}
METHODS = ('get', 'put', 'post', 'delete', 'patch', 'head', 'options')
_PARAMETER = re.compile(r'\{[^}]*\}')


def generic(path: str) -> str:
    """``path`` with its parameters written {}."""
    return _PARAMETER.sub('{}', path)


def concrete(path: str) -> str:
    """``path`` with every parameter a name nothing has."""
    return _PARAMETER.sub('nosuch', path)


class RoutesTest(base.ApiStackTest, helpers.ApiChecks):

    def document(self) -> dict:
        return self.assert_status(200, self.as_admin.get('/v1/openapi.json'))

    def document_routes(self) -> set[tuple[str, str]]:
        return {(method.upper(), path) for path, operations in self.document()['paths'].items()
                for method in operations if method in METHODS}

    def test_the_document_has_every_route_and_only_those(self):
        document = self.document()
        self.assertTrue(document['openapi'].startswith('3.'))
        served = set()
        # The routes as served: those of the included routers too.
        for route in fastapi_routing.iter_route_contexts(self.api_app().routes):
            methods = route.methods
            path = route.path or ''
            if not methods or path.startswith('/dashboard'):
                continue
            served.update((method, path) for method in methods if method != 'HEAD')
        documented = self.document_routes()
        # The document does not list itself (FastAPI's way).
        served.discard(('GET', '/v1/openapi.json'))
        self.assertEqual(set(), served - documented, 'served, not in the document')
        self.assertEqual(set(), documented - served, 'in the document, not served')
        for path in ('/healthz', '/metrics', '/v1/clouds', '/v1/clouds/{}/hosts/{}',
                     '/v1/deployments', '/v1/monitoring', '/v1/images/{}/file'):
            self.assertIn(path, {generic(p) for _, p in documented})

    def test_every_route_but_the_public_ones_needs_a_token(self):
        documented = self.document_routes()
        self.assertTrue(PUBLIC <= documented, PUBLIC - documented)
        # The document itself is not public, nor the version documents.
        self.assert_error(401, self.anonymous.get('/v1/openapi.json'))
        for method, path in sorted(documented - PUBLIC):
            for client in (self.anonymous, self.client_with('no-such-token'),
                           self.client_with(None, {'Authorization': 'Bearer no-such-token'})):
                response = client.request(method, concrete(path))
                self.assert_error(401, response)
                self.assertEqual('Token', response.headers.get('WWW-Authenticate'),
                                 f'{method} {path}')
        self.assertEqual({'status': 'ok'}, self.assert_status(
            200, self.anonymous.get('/healthz')))

    def test_a_member_is_refused_exactly_the_admin_only_routes(self):
        documented = {(method, generic(path)): path for method, path in self.document_routes()}
        self.assertTrue(ADMIN_ONLY <= set(documented), ADMIN_ONLY - set(documented))
        for key, path in sorted(documented.items()):
            if key == REVOKES_THE_TOKEN or key in PUBLIC:
                continue
            method = key[0]
            response = self.as_member.request(method, concrete(path))
            if key in ADMIN_ONLY:
                self.assert_error(403, response)
            else:
                self.assertNotIn(response.status_code, (401, 403),
                                 f'{method} {path}: {response.text}')
            # And the admin is refused nothing.
            self.assertNotIn(self.as_admin.request(method, concrete(path)).status_code,
                             (401, 403), f'{method} {path}')
        self.assert_error(403, self.as_member.put('/v1/images/sneaky/file',
                                                  params={'format': 'raw'},
                                                  content=helpers.RAW_IMAGE))
        self.assert_error(404, self.as_admin.get('/v1/images/sneaky'))

    def test_a_member_deletes_its_own_deployments_only(self):
        mine = self.assert_status(202, self.as_member.post('/v1/deployments', json={
            'image': self.IMAGE, 'count': 1}))['deployment']
        self.addCleanup(helpers.delete_deployment, self.as_admin, mine['id'])
        bobs = self.assert_status(202, self.as_bob.post('/v1/deployments', json={
            'image': self.IMAGE, 'count': 1}))['deployment']
        self.addCleanup(helpers.delete_deployment, self.as_admin, bobs['id'])
        self.assertEqual(self.user_name(self.as_bob), bobs['owner'])

        self.assert_error(403, self.as_member.delete(f'/v1/deployments/{bobs["id"]}'))
        self.assertNotEqual('deleted', self.as_admin.get(
            f'/v1/deployments/{bobs["id"]}').json()['deployment']['state'])
        self.assert_error(403, self.as_member.post(f'/v1/deployments/{mine["id"]}/snapshots'))
        # A member reads every deployment (read is for all).
        self.assert_status(200, self.as_member.get(f'/v1/deployments/{bobs["id"]}'))

        self.assert_status(202, self.as_member.delete(f'/v1/deployments/{mine["id"]}'))
        helpers.wait_deleted(self.as_admin, mine['id'])
        # The admin deletes anyone's.
        self.assert_status(202, self.as_admin.delete(f'/v1/deployments/{bobs["id"]}'))
        helpers.wait_deleted(self.as_admin, bobs['id'])

    def test_passwords_are_stored_as_argon2_hashes(self):
        password = 'a-long-password-1'
        self.assert_status(201, self.as_admin.post('/v1/users', json={
            'name': 'hashed', 'password': password, 'role': 'member'}))
        self.addCleanup(self.as_admin.delete, '/v1/users/hashed')
        database = db_api.Database(self.conf)
        self.addCleanup(database.dispose)
        with database.session() as session:
            stored = db_api.api_user_get(session, 'hashed').password_hash
        self.assertTrue(stored.startswith('$argon2id$'), stored)
        self.assertNotIn(password, stored)
        self.assertTrue(argon2.PasswordHasher().verify(stored, password))
        self.assertRaises(argon2.exceptions.VerifyMismatchError,
                          argon2.PasswordHasher().verify, stored, 'a-long-password-2')


class SecurityHeadersTest(base.ApiStackTest, helpers.ApiChecks):

    def assert_headers(self, response: httpx.Response, no_store: bool = True) -> None:
        where = f'{response.request.method} {response.request.url}'
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(value, response.headers.get(name), where)
        if no_store:
            self.assertIn('no-store', response.headers.get('Cache-Control', ''), where)

    def test_every_answer_refuses_framing_and_sniffing(self):
        browser = Browser(self)
        self.assert_headers(browser.client.get('/dashboard/login'))
        browser.login(self.ADMIN, self.ADMIN_PASSWORD)
        for page in ('/dashboard/', '/dashboard/clouds', '/dashboard/clouds/new',
                     '/dashboard/applications', '/dashboard/deployments',
                     '/dashboard/monitoring', '/dashboard/clouds/default'):
            response = browser.client.get(page)
            self.assert_status(200, response)
            self.assertIn('text/html', response.headers['Content-Type'])
            self.assert_headers(response)
        for response in (self.as_admin.get('/v1/clouds'), self.as_admin.get('/v1/nosuch'),
                         self.anonymous.get('/v1/clouds'), self.as_admin.get('/')):
            self.assert_headers(response)
        self.assert_headers(self.anonymous.get('/healthz'), no_store=False)


class Browser:
    """An httpx client keeping cookies, as a browser of the dashboard does."""

    def __init__(self, test: base.ApiStackTest):
        self.test = test
        self.client = httpx.Client(base_url=test.as_admin.base_url, timeout=helpers.TIMEOUT)
        test.addCleanup(self.client.close)

    @property
    def csrf(self) -> str:
        return self.client.cookies['vmcloud_csrf']

    def login(self, name: str, password: str) -> None:
        page = self.client.get('/dashboard/login')
        self.test.assertEqual(200, page.status_code, page.text)
        self.test.assertIn('vmcloud_csrf', self.client.cookies)
        self.test.assertIn(f'value="{self.csrf}"', page.text)
        response = self.client.post('/dashboard/login', data={
            'username': name, 'password': password, 'csrf_token': self.csrf})
        self.test.assertEqual(303, response.status_code, response.text)
        self.test.assertIn('vmcloud_session', self.client.cookies)


class CsrfTest(base.ApiStackTest, helpers.ApiChecks):

    def test_a_dashboard_post_without_the_token_of_its_cookie_is_refused(self):
        browser = Browser(self)
        browser.login(self.ADMIN, self.ADMIN_PASSWORD)
        form = {'name': 'forged', 'connection_limit': '3'}
        refusals = [
            browser.client.post('/dashboard/clouds', data=form),
            browser.client.post('/dashboard/clouds', data={**form, 'csrf_token': ''}),
            browser.client.post('/dashboard/clouds',
                                data={**form, 'csrf_token': browser.csrf[::-1]}),
            browser.client.post('/dashboard/clouds', data={**form, 'csrf_token': 'x' * 43}),
            # The right token from another site.
            browser.client.post('/dashboard/clouds', data={**form, 'csrf_token': browser.csrf},
                                headers={'Origin': 'http://evil.example'}),
        ]
        for response in refusals:
            self.assertEqual(403, response.status_code, response.text)
            self.assert_error(404, self.as_admin.get('/v1/clouds/forged'))
        # A browser without the cookie (another site's form) with a token it made up.
        forged = httpx.Client(base_url=self.as_admin.base_url,
                              cookies={'vmcloud_session': browser.client.cookies[
                                  'vmcloud_session']})
        self.addCleanup(forged.close)
        self.assertEqual(403, forged.post('/dashboard/clouds', data={
            **form, 'csrf_token': browser.csrf}).status_code)
        self.assert_error(404, self.as_admin.get('/v1/clouds/forged'))
        # The form with its token does it: the refusals were for the token alone.
        response = browser.client.post('/dashboard/clouds', data={
            **form, 'csrf_token': browser.csrf})
        self.assertEqual(303, response.status_code, response.text)
        self.addCleanup(self.as_admin.delete, '/v1/clouds/forged')
        self.assertEqual(3, self.as_admin.get('/v1/clouds/forged').json()['cloud'][
            'connection_limit'])
        self.assertEqual(403, browser.client.post('/dashboard/clouds/forged/delete').status_code)
        self.assert_status(200, self.as_admin.get('/v1/clouds/forged'))

    def test_the_login_form_needs_its_token_too(self):
        browser = Browser(self)
        browser.client.get('/dashboard/login')
        response = browser.client.post('/dashboard/login', data={
            'username': self.ADMIN, 'password': self.ADMIN_PASSWORD})
        self.assertEqual(403, response.status_code, response.text)
        self.assertNotIn('vmcloud_session', browser.client.cookies)

    def test_the_api_takes_no_cookie(self):
        browser = Browser(self)
        browser.login(self.ADMIN, self.ADMIN_PASSWORD)
        self.assert_error(401, browser.client.get('/v1/clouds'))
        self.assert_error(401, browser.client.post('/v1/clouds', json={
            'name': 'bycookie', 'connection_limit': 1}))
        self.assert_error(404, self.as_admin.get('/v1/clouds/bycookie'))


class BodiesTest(base.ApiStackTest, helpers.ApiChecks):

    def padded_cloud(self, name: str, size: int) -> bytes:
        """A valid body creating cloud ``name``, padded with JSON whitespace to ``size``
        bytes: only its size is wrong."""
        body = b'{"name": "%s", "connection_limit": 2}' % name.encode()
        return body[:-1] + b' ' * (size - len(body)) + b'}'

    def test_a_body_over_the_limit_is_413_and_nothing_is_made(self):
        limit = self.conf.api.max_body_bytes
        headers = {'Content-Type': 'application/json'}
        too_big = self.padded_cloud('toobig', limit + 1)
        self.assert_error(413, self.as_admin.post('/v1/clouds', content=too_big,
                                                  headers=headers))

        def chunks(data: bytes, size: int = 65536):
            for offset in range(0, len(data), size):
                yield data[offset:offset + size]
        # No Content-Length: chunked, the limit is on the bytes read.
        response = self.as_admin.post('/v1/clouds', content=chunks(too_big), headers=headers)
        self.assertNotIn('Content-Length', response.request.headers)
        self.assertEqual('chunked', response.request.headers.get('Transfer-Encoding'))
        self.assert_error(413, response)
        self.assert_error(404, self.as_admin.get('/v1/clouds/toobig'))
        # Far over it, announced: refused before it is read (the rest is never sent).
        self.assertEqual(413, self.status_of_announced(8 * limit, first_bytes=65536))
        self.assert_error(404, self.as_admin.get('/v1/clouds/huge'))
        # Unauthenticated: 413 or 401, never made.
        self.assertIn(self.anonymous.post('/v1/clouds', content=too_big,
                                          headers=headers).status_code, (401, 413))

        # At the limit it is taken, chunked or not.
        self.assert_status(201, self.as_admin.post(
            '/v1/clouds', content=self.padded_cloud('atlimit', limit), headers=headers))
        self.addCleanup(self.as_admin.delete, '/v1/clouds/atlimit')
        self.assert_status(201, self.as_admin.post(
            '/v1/clouds', content=chunks(self.padded_cloud('atlimit2', limit)),
            headers=headers))
        self.addCleanup(self.as_admin.delete, '/v1/clouds/atlimit2')

    def status_of_announced(self, length: int, first_bytes: int) -> int:
        """The status answered to a POST /v1/clouds announcing a body of ``length`` bytes
        of which only ``first_bytes`` are sent."""
        url = urllib.parse.urlsplit(str(self.as_admin.base_url))
        with socket.create_connection((url.hostname, url.port), timeout=helpers.TIMEOUT) as sock:
            sock.sendall(b'POST /v1/clouds HTTP/1.1\r\nHost: %s\r\n'
                         b'Content-Type: application/json\r\nX-Auth-Token: %s\r\n'
                         b'Content-Length: %d\r\n\r\n' % (
                             url.netloc.encode(), self.as_admin.headers['X-Auth-Token'].encode(),
                             length))
            sock.sendall(b' ' * first_bytes)
            answer = b''
            while b'\r\n' not in answer:
                block = sock.recv(4096)
                if not block:
                    break
                answer += block
        return int(answer.split(b' ', 2)[1])

    def test_a_client_sending_all_of_a_body_over_the_limit_gets_the_413(self):
        """Not a reset connection: a client that sends its whole body before it reads
        (as httpx, requests and most clients do) must read the 413, however often."""
        body = self.padded_cloud('whole', 8 * self.conf.api.max_body_bytes)
        headers = {'Content-Type': 'application/json'}

        def chunks(size: int = 65536):
            for offset in range(0, len(body), size):
                yield body[offset:offset + size]
        for attempt in range(10):
            # Chunked, then announced: a refusal must not spoil the next.
            for content in (chunks(), body):
                try:
                    response = self.as_admin.post('/v1/clouds', content=content,
                                                  headers=headers)
                except httpx.TransportError as exc:
                    self.fail(f'attempt {attempt}: the connection broke instead of '
                              f'answering 413: {exc!r}')
                self.assert_error(413, response)
        self.assert_error(404, self.as_admin.get('/v1/clouds/whole'))

    def test_an_image_may_be_larger_than_max_body_bytes(self):
        size = self.conf.api.max_body_bytes + 1024 * 1024
        data = helpers.RAW_IMAGE * (size // len(helpers.RAW_IMAGE) + 1)
        self.assert_status(201, self.as_admin.put('/v1/images/biggish/file',
                                                  params={'format': 'raw'}, content=data))
        self.assert_status(200, self.as_admin.get('/v1/images/biggish'))

    def test_malformed_json_is_422_and_nothing_is_made(self):
        headers = {'Content-Type': 'application/json'}
        for body in (b'{"name": "broken", "connection_limit": 2',
                     b'{"name": "broken", "connection_limit": 2,}',
                     b"{'name': 'broken', 'connection_limit': 2}",
                     b'not json at all',
                     b'[{"name": "broken", "connection_limit": 2}]',
                     b'"broken"', b'null',
                     b'{"name": "broken\xff", "connection_limit": 2}',
                     b''):
            self.assert_error(422, self.as_admin.post('/v1/clouds', content=body,
                                                      headers=headers))
        self.assert_error(404, self.as_admin.get('/v1/clouds/broken'))

    def test_a_wrong_content_type_is_refused(self):
        body = b'{"name": "typed", "connection_limit": 2}'
        for content_type in ('text/plain', 'application/x-www-form-urlencoded',
                             'application/xml', 'multipart/form-data; boundary=x'):
            response = self.as_admin.post('/v1/clouds', content=body,
                                          headers={'Content-Type': content_type})
            self.assertIn(response.status_code, (415, 422), content_type)
            self.assert_error(response.status_code, response)
        self.assert_error(404, self.as_admin.get('/v1/clouds/typed'))
        # The same body as JSON is taken: the refusals were for its type.
        self.assert_status(201, self.as_admin.post(
            '/v1/clouds', content=body, headers={'Content-Type': 'application/json'}))
        self.as_admin.delete('/v1/clouds/typed')


class LoginThrottleTest(base.ApiStackTest, helpers.ApiChecks):
    """A class of its own: its stack remembers the failures for [api] login_window."""

    def test_logins_are_throttled_after_too_many_failures(self):
        self.assert_status(201, self.as_admin.post('/v1/users', json={
            'name': 'guessed', 'password': 'the-right-password', 'role': 'member'}))
        attempts = self.conf.api.login_attempts
        wrong = {'username': 'guessed', 'password': 'a-wrong-password'}
        for _ in range(attempts):
            self.assert_error(401, self.anonymous.post('/v1/auth/tokens', json=wrong))
        throttled = self.anonymous.post('/v1/auth/tokens', json=wrong)
        self.assert_error(http.HTTPStatus.TOO_MANY_REQUESTS, throttled)
        retry_after = int(throttled.headers['Retry-After'])
        self.assertGreater(retry_after, 0)
        self.assertLessEqual(retry_after, self.conf.api.login_window)
        # The right password is refused too while throttled.
        right = self.anonymous.post('/v1/auth/tokens', json={
            'username': 'guessed', 'password': 'the-right-password'})
        self.assert_error(429, right)
        self.assertNotIn('X-Subject-Token', right.headers)
        self.assertIn('Retry-After', right.headers)
