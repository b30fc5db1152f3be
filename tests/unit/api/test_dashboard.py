"""The dashboard over the real API app (make_app) and a real SQLite Identity, with a stub
dispatcher and monitor: sessions, CSRF, roles, the pages and the ids the browser test
uses, escaping, and the JSON the monitoring page polls."""
import copy
import html.parser
import os
import re
import uuid

from fastapi import testclient

from tests import base
from tests.unit.api import test_app
from vmcloud import exception
from vmcloud.api import app as api_app
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api.dashboard import pages
from vmcloud.db import api as db_api

ADMIN, ADMIN_PASSWORD = 'admin', 'admin-password'
MEMBER, MEMBER_PASSWORD = 'member', 'member-password'
SCRIPT = '<script>alert(1)</script>'
TEMPLATES = os.path.join(pages.HERE, 'templates')


class StubDispatcher:
    """What the dashboard asks of DispatcherAPI, in memory; ``changes`` records every
    call that would change something."""

    def __init__(self):
        self.changes: list[tuple] = []
        self.hosts = ['node1', 'node2', 'node3']
        self.clouds = {'default': self._cloud('default', 100, []),
                       'web': self._cloud('web', 20, ['node1'])}
        self.applications = {}
        self.deployments = {}
        self.add_application('hold', 'guest:1')

    @staticmethod
    def _cloud(name: str, limit: int, hosts: list[str]) -> dict:
        return {'name': name, 'connection_limit': limit, 'hosts': list(hosts),
                'deployments': [], 'created_at': '2024-05-01T12:00:00'}

    def add_application(self, name: str, image: str) -> dict:
        self.applications[name] = {
            'name': name, 'image': image, 'port': 80, 'protocol': 'http', 'vcpus': 1,
            'memory_mib': 256, 'boot': {}, 'health': {'kind': 'marker'},
            'connection_limit': None, 'deployments': [], 'created_at': '2024-05-01T12:00:00'}
        return self.applications[name]

    def add_deployment(self, owner: str, state: str = 'active', reason: str = '',
                       application: str = 'hold', cloud: str = 'default') -> dict:
        deployment_id = str(uuid.uuid4())
        self.deployments[deployment_id] = {
            'id': deployment_id, 'image': 'guest:1', 'count': 1, 'min_count': 1,
            'state': state, 'reason': reason, 'cloud': cloud, 'application': application,
            'owner': owner, 'port': 80, 'protocol': 'http', 'listener_port': 8001,
            'created_at': f'2024-05-01T12:00:{len(self.deployments):02d}', 'network': None,
            'instances': [{'id': 'i1', 'name': f'{application}-1', 'state': state,
                           'host': 'node1', 'address': '10.0.0.2', 'reason': reason}]}
        return self.deployments[deployment_id]

    @staticmethod
    def _page(rows: list[dict], key: str, limit, marker) -> list[dict]:
        if marker is not None:
            keys = [r[key] for r in rows]
            if marker not in keys:
                raise exception.MarkerNotFound(marker)
            rows = rows[keys.index(marker) + 1:]
        return rows if limit is None else rows[:limit]

    # -- hosts and clouds

    def list_hosts(self, limit=None, marker=None):
        return self._page([{'name': h, 'state': 'up'} for h in self.hosts], 'name', limit,
                          marker)

    def list_clouds(self, limit=None, marker=None):
        return self._page(copy.deepcopy([self.clouds[n] for n in sorted(self.clouds)]),
                          'name', limit, marker)

    def show_cloud(self, name):
        if name not in self.clouds:
            raise exception.CloudNotFound(name)
        return copy.deepcopy(self.clouds[name])

    def create_cloud(self, name, connection_limit, hosts=None):
        if not re.fullmatch(r'[a-z0-9-]{1,32}', name):
            raise exception.InvalidRequest(f'cloud name {name!r} must be [a-z0-9-]{{1,32}}')
        if name in self.clouds:
            raise exception.NameInUse('cloud', name)
        self.changes.append(('create_cloud', name, connection_limit, list(hosts or [])))
        self.clouds[name] = self._cloud(name, connection_limit, hosts or [])
        return self.show_cloud(name)

    def update_cloud(self, name, connection_limit=None, add_hosts=None, remove_hosts=None):
        cloud = self.clouds[self.show_cloud(name)['name']]
        for host in add_hosts or []:
            if host not in self.hosts:
                raise exception.HostNotFound(host)
        self.changes.append(('update_cloud', name, connection_limit, list(add_hosts or []),
                             list(remove_hosts or [])))
        if connection_limit is not None:
            cloud['connection_limit'] = connection_limit
        cloud['hosts'] = sorted((set(cloud['hosts']) | set(add_hosts or []))
                                - set(remove_hosts or []))
        return self.show_cloud(name)

    def delete_cloud(self, name):
        shown = self.show_cloud(name)
        self.changes.append(('delete_cloud', name))
        del self.clouds[name]
        return shown

    # -- applications

    def list_applications(self, limit=None, marker=None):
        return self._page(copy.deepcopy([self.applications[n]
                                         for n in sorted(self.applications)]),
                          'name', limit, marker)

    def show_application(self, name):
        if name not in self.applications:
            raise exception.ApplicationNotFound(name)
        return copy.deepcopy(self.applications[name])

    def create_application(self, name, image, port, protocol, vcpus=1, memory_mib=256,
                           boot=None, health=None, connection_limit=None):
        if name in self.applications:
            raise exception.NameInUse('application', name)
        self.changes.append(('create_application', name, image, port, protocol, vcpus,
                             memory_mib, boot, health, connection_limit))
        application = self.add_application(name, image)
        application.update(port=port, protocol=protocol, vcpus=vcpus, memory_mib=memory_mib,
                           boot=boot or {}, health=health or {'kind': 'marker'},
                           connection_limit=connection_limit)
        return self.show_application(name)

    def update_application(self, name, changes):
        self.show_application(name)
        self.changes.append(('update_application', name, changes))
        self.applications[name].update(changes)
        return self.show_application(name)

    def delete_application(self, name):
        shown = self.show_application(name)
        self.changes.append(('delete_application', name))
        del self.applications[name]
        return shown

    # -- deployments

    def list_deployments(self, limit=None, marker=None, cloud=None, owner=None):
        rows = sorted(self.deployments.values(), key=lambda d: d['created_at'], reverse=True)
        rows = [{k: v for k, v in d.items() if k not in ('instances', 'network')}
                for d in rows if cloud in (None, d['cloud']) and owner in (None, d['owner'])]
        return self._page(rows, 'id', limit, marker)

    def show_deployment(self, deployment_id):
        if deployment_id not in self.deployments:
            raise exception.DeploymentNotFound(deployment_id)
        return copy.deepcopy(self.deployments[deployment_id])

    def deploy_application(self, application, cloud, count, min_count=None, owner=None):
        self.show_application(application)
        self.show_cloud(cloud)
        self.changes.append(('deploy_application', application, cloud, count, min_count,
                             owner))
        deployment = self.add_deployment(owner, 'building', application=application,
                                         cloud=cloud)
        return self.show_deployment(deployment['id'])

    def delete_deployment(self, deployment_id):
        self.show_deployment(deployment_id)
        self.changes.append(('delete_deployment', deployment_id))
        self.deployments[deployment_id]['state'] = 'deleting'
        return self.show_deployment(deployment_id)


class StubMonitor:
    def __init__(self):
        self.connection_list = [
            {'client': '192.0.2.7', 'client_port': 40000, 'cloud': 'web',
             'application': 'hold', 'deployment': 'd1', 'instance': 'i1',
             'instance_name': 'hold-1', 'listener_port': 8001, 'started_at': '2024-05-01T12:00:00',
             'duration_seconds': 75.5}]

    def live(self) -> dict:
        return {'sampled_at': '2024-05-01T12:01:15.250000', 'gateway': 'ok',
                'clouds': [{'name': 'default', 'connection_limit': 100, 'deployments': 0,
                            'applications_deployed': 0, 'applications_running': 0,
                            'instances_running': 0, 'users': 0, 'connections': 0,
                            'available': 100, 'hosts_up': 3, 'hosts_total': 3},
                           {'name': 'web', 'connection_limit': 20, 'deployments': 1,
                            'applications_deployed': 1, 'applications_running': 1,
                            'instances_running': 2, 'users': 1, 'connections': 1,
                            'available': 19, 'hosts_up': 1, 'hosts_total': 1}],
                'instances': {'active': 2}, 'deployments': {'active': 1}}

    def connections(self, cloud=None) -> list[dict]:
        return copy.deepcopy(self.connection_list)

    def events(self, limit=50) -> list[dict]:
        return [{'at': '2024-05-01T12:00:00', 'event': 'deployment.create',
                 'payload': {'reason': SCRIPT}}]

    def history(self) -> dict:
        return {'interval': 1.0, 'samples': [
            {'at': '2024-05-01T12:01:14', 'clouds': {'web': {'connections': 0,
                                                             'instances_running': 2,
                                                             'users': 0}}},
            {'at': '2024-05-01T12:01:15', 'clouds': {'web': {'connections': 1,
                                                             'instances_running': 2,
                                                             'users': 1}}}]}


class Page(html.parser.HTMLParser):
    """Every element of an HTML page: (tag, attributes), in order, and the forms."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.forms: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {k: (v if v is not None else '') for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == 'form':
            self.forms.append({'attributes': attributes, 'fields': []})
        elif tag in ('input', 'select', 'button') and self.forms:
            self.forms[-1]['fields'].append((tag, attributes))

    def by_id(self, element_id: str) -> tuple[str, dict] | None:
        found = [e for e in self.elements if e[1].get('id') == element_id]
        return found[0] if found else None

    def having(self, name: str, value: str | None = None) -> list[tuple[str, dict]]:
        return [e for e in self.elements
                if name in e[1] and (value is None or e[1][name] == value)]

    def with_class(self, css_class: str) -> list[tuple[str, dict]]:
        return [e for e in self.elements if css_class in e[1].get('class', '').split()]


class DashboardTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/vmcloud.sqlite',
                               'database')
        self.conf.set_override('login_attempts', 3, 'api')
        db = db_api.Database(self.conf)
        db.upgrade()
        self.addCleanup(db.dispose)
        # The pages are under test, not the hash: argon2 at its cheapest (the defaults
        # take half a second a hash, on purpose).
        self.identity = auth.Identity(self.conf, db, hasher=test_app.FAST_HASHER)
        self.identity.create_user(ADMIN, ADMIN_PASSWORD, 'admin')
        self.identity.create_user(MEMBER, MEMBER_PASSWORD, 'member')
        self.dispatcher = StubDispatcher()
        self.monitor = StubMonitor()
        self.client = self.browser()

    def browser(self, base_url: str = 'http://testserver') -> testclient.TestClient:
        services = context.Services(conf=self.conf, dispatcher=self.dispatcher,
                                    identity=self.identity, warehouse=lambda: None,
                                    monitor=self.monitor)
        client = testclient.TestClient(api_app.make_app(services), base_url=base_url,
                                       follow_redirects=False)
        self.addCleanup(client.close)
        return client

    # -- helpers

    def csrf(self, client=None) -> str:
        client = client or self.client
        if 'vmcloud_csrf' not in client.cookies:
            client.get('/dashboard/login')
        return client.cookies['vmcloud_csrf']

    def login(self, name: str = ADMIN, password: str = ADMIN_PASSWORD, client=None,
              **extra):
        client = client or self.client
        return client.post('/dashboard/login', data={
            'username': name, 'password': password, 'csrf_token': self.csrf(client),
            **extra})

    def page(self, path: str, status: int = 200, client=None) -> Page:
        response = (client or self.client).get(path)
        self.assertEqual(status, response.status_code, f'{path}: {response.text[:3000]}')
        self.assertIn('text/html', response.headers['content-type'])
        return Page(response.text)

    def post(self, path: str, data: dict | None = None, client=None, **kwargs):
        client = client or self.client
        return client.post(path, data={'csrf_token': self.csrf(client), **(data or {})},
                           **kwargs)

    def assert_ids(self, page: Page, *ids: str) -> None:
        missing = [i for i in ids if page.by_id(i) is None]
        self.assertEqual([], missing)

    def assert_alert(self, response, *fragments: str) -> None:
        page = Page(response.text)
        alerts = [e for e in page.with_class('error') if e[1].get('role') == 'alert']
        self.assertEqual(1, len(alerts), response.text)
        for fragment in fragments:
            self.assertIn(fragment, response.text)

    # -- sessions

    def test_login_sets_the_session_cookie_and_goes_on(self):
        page = self.client.get('/dashboard/login')
        self.assertEqual(200, page.status_code)
        csrf_cookie = page.headers['set-cookie']
        self.assertIn('vmcloud_csrf=', csrf_cookie)
        self.assertIn('samesite=strict', csrf_cookie.lower())
        self.assertIn(f'value="{self.client.cookies["vmcloud_csrf"]}"', page.text)
        self.assert_ids(Page(page.text), 'username', 'password', 'login')

        response = self.login()
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual('/dashboard/', response.headers['location'])
        cookie = response.headers['set-cookie']
        self.assertIn('vmcloud_session=', cookie)
        attributes = {part.strip().split('=')[0].lower(): part.strip()
                      for part in cookie.split(';')[1:]}
        self.assertEqual({'httponly', 'max-age', 'path', 'samesite'}, set(attributes))
        self.assertEqual('samesite=strict', attributes['samesite'].lower())
        self.assertEqual('Path=/', attributes['path'])
        self.assertEqual(f'Max-Age={self.conf.api.token_ttl}', attributes['max-age'])
        token = self.client.cookies['vmcloud_session']
        self.assertEqual(ADMIN, self.identity.validate(token).name)
        self.page('/dashboard/')

    def test_secure_cookies_when_configured(self):
        self.conf.set_override('secure_cookies', True, 'api')
        client = self.browser('https://testserver')
        page = client.get('/dashboard/login')
        self.assertIn('secure', page.headers['set-cookie'].lower())
        response = self.login(client=client)
        self.assertEqual(303, response.status_code)
        self.assertIn('secure', response.headers['set-cookie'].lower())

    def test_a_wrong_password_or_user_is_one_generic_alert(self):
        wrong_password = self.login(ADMIN, 'not-the-password')
        unknown_user = self.login('nobody', 'not-the-password')
        for response in (wrong_password, unknown_user):
            self.assertEqual(401, response.status_code)
            self.assert_alert(response, 'Wrong user name or password.')
            self.assertNotIn('vmcloud_session', self.client.cookies)
        self.assertEqual(wrong_password.text.replace('value="admin"', ''),
                         unknown_user.text.replace('value="nobody"', ''))

    def test_a_throttled_login_says_when_to_try_again(self):
        for _ in range(self.conf.api.login_attempts):
            self.login(ADMIN, 'not-the-password')
        response = self.login(ADMIN, ADMIN_PASSWORD)
        self.assertEqual(429, response.status_code, response.text)
        self.assertGreaterEqual(int(response.headers['retry-after']), 1)
        self.assert_alert(response, f'try again in {response.headers["retry-after"]} s')
        self.assertNotIn('vmcloud_session', self.client.cookies)

    def test_a_page_without_a_session_goes_to_the_login(self):
        for path in ('/dashboard/', '/dashboard/clouds', '/dashboard/monitoring',
                     '/dashboard/deployments?cloud=web'):
            response = self.client.get(path)
            self.assertEqual(303, response.status_code, path)
            location = response.headers['location']
            self.assertTrue(location.startswith('/dashboard/login'), location)
        self.assertEqual('/dashboard/login?next=%2Fdashboard%2Fclouds',
                         self.client.get('/dashboard/clouds').headers['location'])
        self.client.cookies.set('vmcloud_session', 'made-up')
        self.assertEqual(303, self.client.get('/dashboard/clouds').status_code)

    def test_the_login_goes_on_to_the_page_asked_for_on_this_site_only(self):
        page = self.page('/dashboard/login?next=/dashboard/clouds/web')
        self.assertEqual('/dashboard/clouds/web', page.having('name', 'next')[0][1]['value'])
        response = self.login(next='/dashboard/clouds/web')
        self.assertEqual('/dashboard/clouds/web', response.headers['location'])
        for elsewhere in ('https://evil.example/', '//evil.example/dashboard/',
                          '/\\evil.example', '/dashboard/../v1', '/dashboard/%2e%2E/v1',
                          'javascript:alert(1)', '/dashboard/login', '/dashboard/x\r\ny'):
            client = self.browser()
            response = self.login(client=client, next=elsewhere)
            self.assertEqual('/dashboard/', response.headers['location'], elsewhere)

    def test_the_login_page_of_a_browser_logged_in_goes_on(self):
        self.login()
        response = self.client.get('/dashboard/login?next=/dashboard/clouds')
        self.assertEqual((303, '/dashboard/clouds'),
                         (response.status_code, response.headers['location']))
        # A session no longer valid is none: the login page.
        self.identity.revoke(self.client.cookies['vmcloud_session'])
        self.page('/dashboard/login?next=/dashboard/clouds')
        self.client.cookies.set('vmcloud_session', 'made-up')
        self.page('/dashboard/login')

    def test_logout_revokes_the_session(self):
        self.login()
        token = self.client.cookies['vmcloud_session']
        response = self.post('/dashboard/logout')
        self.assertEqual(303, response.status_code)
        self.assertEqual('/dashboard/login', response.headers['location'])
        self.assertRaises(exception.Unauthorized, self.identity.validate, token)
        self.client.cookies.set('vmcloud_session', token)
        self.assertEqual(303, self.client.get('/dashboard/').status_code)

    def test_the_dashboard_root_is_the_overview(self):
        response = self.client.get('/dashboard')
        self.assertEqual(303, response.status_code)
        self.assertEqual('/dashboard/', response.headers['location'])

    # -- CSRF and framing

    def test_a_post_without_its_csrf_token_does_nothing(self):
        self.login()
        form = {'name': 'forged', 'connection_limit': '3'}
        token = self.csrf()
        for data in (form, {**form, 'csrf_token': ''}, {**form, 'csrf_token': token[::-1]},
                     {**form, 'csrf_token': 'x' * 43}, {**form, 'csrf_token': 'é' * 43}):
            response = self.client.post('/dashboard/clouds', data=data)
            self.assertEqual(403, response.status_code, data)
            self.assert_alert(response, 'nothing was done')
        # The cookie lost (another site's form): its token is no good alone.
        self.client.cookies.delete('vmcloud_csrf')
        self.assertEqual(403, self.client.post('/dashboard/clouds', data={
            **form, 'csrf_token': token}).status_code)
        self.assertEqual([], self.dispatcher.changes)
        self.assertNotIn('forged', self.dispatcher.clouds)

    def test_a_post_from_another_origin_does_nothing(self):
        self.login()
        form = {'name': 'forged', 'connection_limit': '3'}
        for origin in ('http://evil.example', 'null', 'http://testserver.evil.example'):
            response = self.post('/dashboard/clouds', form, headers={'Origin': origin})
            self.assertEqual(403, response.status_code, origin)
        self.assertEqual([], self.dispatcher.changes)
        response = self.post('/dashboard/clouds', form, headers={'Origin': 'http://testserver'})
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual([('create_cloud', 'forged', 3, [])], self.dispatcher.changes)

    def test_the_login_form_needs_its_csrf_token(self):
        self.client.get('/dashboard/login')
        response = self.client.post('/dashboard/login', data={'username': ADMIN,
                                                              'password': ADMIN_PASSWORD})
        self.assertEqual(403, response.status_code)
        self.assertNotIn('vmcloud_session', self.client.cookies)

    def test_every_form_posts_with_the_csrf_token(self):
        self.login()
        token = self.csrf()
        deployment = self.dispatcher.add_deployment(ADMIN)
        for path in ('/dashboard/', '/dashboard/clouds', '/dashboard/clouds/new',
                     '/dashboard/clouds/web', '/dashboard/clouds/web/edit',
                     '/dashboard/applications', '/dashboard/applications/new',
                     '/dashboard/applications/hold', '/dashboard/applications/hold/edit',
                     '/dashboard/deployments', '/dashboard/deployments/new',
                     f'/dashboard/deployments/{deployment["id"]}', '/dashboard/monitoring'):
            page = self.page(path)
            self.assertTrue(page.forms, path)
            for form in page.forms:
                self.assertEqual('post', form['attributes'].get('method'), path)
                tokens = [f[1].get('value') for f in form['fields']
                          if f[1].get('name') == 'csrf_token']
                self.assertEqual([token], tokens, (path, form))

    def test_every_answer_refuses_framing(self):
        self.login()
        for path in ('/dashboard/login', '/dashboard/', '/dashboard/monitoring'):
            response = self.client.get(path)
            self.assertEqual('DENY', response.headers['x-frame-options'])
            policy = response.headers['content-security-policy']
            self.assertIn("frame-ancestors 'none'", policy)
            self.assertIn("default-src 'self'", policy)
            self.assertIn('no-store', response.headers['cache-control'])

    def test_no_answer_of_the_dashboard_is_cached(self):
        # The app's middleware says so for all of them: the pages, the redirects, the
        # scripts' JSON, the error pages; once (no page adds its own).
        deployment = self.dispatcher.deploy_application('hold', 'default', 1)
        anonymous = self.browser()
        answers = [anonymous.get('/dashboard/'), anonymous.get('/dashboard/monitoring.json')]
        self.login()
        answers += [self.client.get(path) for path in (
            '/dashboard', '/dashboard/', '/dashboard/clouds', '/dashboard/monitoring.json',
            '/dashboard/history.json', '/dashboard/clouds/nosuch',
            f'/dashboard/deployments/{deployment["id"]}/progress.json')]
        for response in answers:
            where = f'{response.request.url} {response.status_code}'
            self.assertEqual(['no-store'], response.headers.get_list('cache-control'), where)

    def test_templates_hold_no_inline_script_or_style(self):
        # The Content-Security-Policy would block them: scripts and styles are files.
        for leaf in sorted(os.listdir(TEMPLATES)):
            with open(os.path.join(TEMPLATES, leaf)) as f:
                text = f.read()
            self.assertIsNone(re.search(r'<script(?![^>]*\ssrc=)', text), leaf)
            self.assertIsNone(re.search(r'<style|\sstyle=|\son[a-z]+=|javascript:', text),
                              leaf)

    def test_static_files_need_no_session(self):
        for leaf in ('dashboard.css', 'monitoring.js', 'deployment.js'):
            response = self.client.get(f'/dashboard/static/{leaf}')
            self.assertEqual(200, response.status_code, leaf)

    # -- roles

    def test_a_member_sees_no_admin_button_and_is_refused_admin_forms(self):
        self.login(MEMBER, MEMBER_PASSWORD)
        clouds = self.page('/dashboard/clouds')
        self.assertIsNotNone(clouds.having('data-name', 'web'))
        self.assertEqual([], clouds.with_class('delete'))
        self.assertIsNone(clouds.by_id('new-cloud'))
        self.assertEqual([], self.page('/dashboard/clouds/web').with_class('delete'))
        self.assertEqual([], self.page('/dashboard/applications').with_class('delete'))
        for path in ('/dashboard/clouds/new', '/dashboard/clouds/web/edit',
                     '/dashboard/applications/new', '/dashboard/applications/hold/edit'):
            self.page(path, status=403)
        for path, data in (('/dashboard/clouds/web/delete', {}),
                           ('/dashboard/clouds', {'name': 'x', 'connection_limit': '1'}),
                           ('/dashboard/clouds/web/edit', {'connection_limit': '1'}),
                           ('/dashboard/clouds/web/hosts', {'host': 'node2'}),
                           ('/dashboard/clouds/web/hosts/node1/delete', {}),
                           ('/dashboard/applications/hold/delete', {}),
                           ('/dashboard/applications/hold/edit', {'image': 'x'})):
            response = self.post(path, data)
            self.assertEqual(403, response.status_code, path)
            self.assert_alert(response)
        self.assertEqual([], self.dispatcher.changes)
        self.assertIn('web', self.dispatcher.clouds)

    def test_admin_sees_the_delete_buttons(self):
        self.login()
        clouds = self.page('/dashboard/clouds')
        self.assertEqual(len(self.dispatcher.clouds), len(clouds.with_class('delete')))
        self.assertIsNotNone(clouds.by_id('new-cloud'))

    def test_a_member_deletes_its_own_deployments_only(self):
        own = self.dispatcher.add_deployment(MEMBER)
        other = self.dispatcher.add_deployment(ADMIN)
        self.login(MEMBER, MEMBER_PASSWORD)
        listed = self.page('/dashboard/deployments')
        rows = [e[1]['data-id'] for e in listed.having('data-id')]
        self.assertEqual({own['id'], other['id']}, set(rows))
        # One delete button: the member's deployment's.
        forms = [f['attributes']['action'] for f in listed.forms
                 if any('delete' in fld[1].get('class', '') for fld in f['fields'])]
        self.assertEqual([f'/dashboard/deployments/{own["id"]}/delete'], forms)
        self.assertEqual([], self.page(f'/dashboard/deployments/{other["id"]}')
                         .with_class('delete'))
        self.assertEqual(403, self.post(f'/dashboard/deployments/{other["id"]}/delete')
                         .status_code)
        self.assertEqual([], self.dispatcher.changes)
        response = self.post(f'/dashboard/deployments/{own["id"]}/delete')
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual([('delete_deployment', own['id'])], self.dispatcher.changes)

    # -- pages

    def test_the_overview_shows_each_cloud_against_its_limit(self):
        self.login()
        page = self.page('/dashboard/')
        self.assertEqual(['default', 'web'], [e[1]['data-cloud'] for e in
                                              page.having('data-cloud')])
        meters = [e[1] for e in page.elements if e[0] == 'meter']
        self.assertEqual([('100', '0'), ('20', '1')], [(m['max'], m['value']) for m in meters])
        self.assertIsNotNone(page.by_id('gateway-status'))

    def test_the_overview_without_a_gateway_says_so(self):
        live = self.monitor.live()
        for cloud in live['clouds']:
            cloud.update(users=None, connections=None, available=None)
        live['gateway'] = 'unavailable: no gateway answered'
        self.monitor.live = lambda: live
        self.login()
        response = self.client.get('/dashboard/')
        self.assertEqual(200, response.status_code)
        self.assertIn('unavailable: no gateway answered', response.text)
        self.assertNotIn('<meter', response.text)

    def test_the_cloud_pages_have_the_ids_of_the_contract(self):
        self.login()
        listed = self.page('/dashboard/clouds')
        self.assertEqual(['default', 'web'], [e[1]['data-name'] for e in
                                              listed.having('data-name')])
        form = self.page('/dashboard/clouds/new')
        self.assert_ids(form, 'name', 'connection_limit', 'hosts', 'save')
        self.assertEqual(self.dispatcher.hosts,
                         [e[1]['value'] for e in form.elements if e[0] == 'option'])
        edit = self.page('/dashboard/clouds/web/edit')
        self.assertEqual('20', edit.by_id('connection_limit')[1]['value'])
        self.assertIn('readonly', edit.by_id('name')[1])
        self.assertEqual(['node1'], [e[1]['value'] for e in edit.elements
                                     if e[0] == 'option' and 'selected' in e[1]])
        shown = self.page('/dashboard/clouds/web')
        self.assertEqual(['node2', 'node3'], [e[1]['value'] for e in shown.elements
                                              if e[0] == 'option'])

    def test_a_cloud_is_made_changed_and_deleted(self):
        self.login()
        response = self.post('/dashboard/clouds', {'name': 'shop', 'connection_limit': '5',
                                                   'hosts': ['node1', 'node2']})
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual('/dashboard/clouds/shop', response.headers['location'])
        response = self.post('/dashboard/clouds/shop/edit', {'connection_limit': '7',
                                                             'hosts': ['node2', 'node3']})
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual(['node2', 'node3'], self.dispatcher.clouds['shop']['hosts'])
        self.assertEqual(7, self.dispatcher.clouds['shop']['connection_limit'])
        self.post('/dashboard/clouds/shop/hosts', {'host': 'node1'})
        self.post('/dashboard/clouds/shop/hosts/node2/delete')
        self.assertEqual(['node1', 'node3'], self.dispatcher.clouds['shop']['hosts'])
        response = self.post('/dashboard/clouds/shop/delete')
        self.assertEqual(303, response.status_code)
        self.assertEqual('/dashboard/clouds?deleted=shop', response.headers['location'])
        self.assertNotIn('shop', self.dispatcher.clouds)
        self.assertIn('Cloud shop deleted.', self.client.get(response.headers['location']).text)

    def test_a_refused_cloud_form_is_shown_again_with_its_values(self):
        self.login()
        response = self.post('/dashboard/clouds', {'name': 'web', 'connection_limit': '9',
                                                   'hosts': ['node3']})
        self.assertEqual(409, response.status_code)
        self.assert_alert(response, 'cloud web exists already')
        page = Page(response.text)
        self.assertEqual('web', page.by_id('name')[1]['value'])
        self.assertEqual('9', page.by_id('connection_limit')[1]['value'])
        self.assertEqual(['node3'], [e[1]['value'] for e in page.elements
                                     if e[0] == 'option' and 'selected' in e[1]])
        response = self.post('/dashboard/clouds', {'name': 'new-one',
                                                   'connection_limit': 'many'})
        self.assertEqual(422, response.status_code)
        self.assert_alert(response, 'connection limit')
        self.assertEqual([], self.dispatcher.changes)

    def test_an_unknown_cloud_is_a_404_page(self):
        self.login()
        response = self.client.get('/dashboard/clouds/nosuch')
        self.assertEqual(404, response.status_code)
        self.assert_alert(response, 'cloud nosuch not found')

    def test_the_application_pages_have_the_ids_of_the_contract(self):
        self.login()
        self.assertIsNotNone(self.page('/dashboard/applications').having('data-name', 'hold'))
        form = self.page('/dashboard/applications/new')
        self.assert_ids(form, 'name', 'image', 'port', 'protocol', 'vcpus', 'memory_mib',
                        'kernel', 'initrd', 'cmdline', 'health_kind', 'health_port',
                        'health_path', 'connection_limit', 'save')
        # Every field has its label.
        labelled = {e[1]['for'] for e in form.elements if e[0] == 'label'}
        fields = {e[1]['id'] for e in form.elements
                  if e[0] in ('input', 'select') and e[1].get('type') != 'hidden'}
        self.assertEqual(set(), fields - labelled)
        self.page('/dashboard/applications/hold')
        self.assertEqual('guest:1', self.page('/dashboard/applications/hold/edit')
                         .by_id('image')[1]['value'])

    def test_an_application_is_made_edited_and_deleted(self):
        self.login()
        response = self.post('/dashboard/applications', {
            'name': 'shop', 'image': 'guest', 'port': '7000', 'protocol': 'tcp',
            'vcpus': '2', 'memory_mib': '512', 'kernel': 'guest-kernel',
            'initrd': 'guest-initrd', 'cmdline': 'console=ttyS0', 'health_kind': 'tcp',
            'health_port': '7000', 'health_path': '', 'connection_limit': ''})
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual(('create_application', 'shop', 'guest', 7000, 'tcp', 2, 512,
                          {'kernel': 'guest-kernel', 'initrd': 'guest-initrd',
                           'cmdline': 'console=ttyS0'},
                          {'kind': 'tcp', 'port': 7000}, None), self.dispatcher.changes[-1])
        # The form as shown, one field changed: only that change is sent.
        edit = self.page('/dashboard/applications/shop/edit')
        values = {e[1]['name']: e[1].get('value', '') for e in edit.elements
                  if e[0] == 'input' and e[1].get('name') not in (None, 'csrf_token')}
        values.update(protocol='tcp', health_kind='tcp', image='guest:2',
                      connection_limit='50')
        response = self.post('/dashboard/applications/shop/edit', values)
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual(('update_application', 'shop', {'image': 'guest:2',
                                                         'connection_limit': 50}),
                         self.dispatcher.changes[-1])
        response = self.post('/dashboard/applications/shop/delete')
        self.assertEqual('/dashboard/applications?deleted=shop', response.headers['location'])
        self.assertNotIn('shop', self.dispatcher.applications)

    def test_an_application_form_is_held_to_the_rules_of_the_api(self):
        self.login()
        form = {'name': 'shop', 'image': 'guest', 'port': '80', 'protocol': 'http',
                'vcpus': '1', 'memory_mib': '256', 'health_kind': 'http',
                'health_port': '80', 'health_path': 'no-slash'}
        response = self.post('/dashboard/applications', form)
        self.assertEqual(422, response.status_code)
        self.assert_alert(response, 'health.http.path')
        self.assertEqual('no-slash', Page(response.text).by_id('health_path')[1]['value'])
        response = self.post('/dashboard/applications/hold/edit', {**form, 'image': 'a b'})
        self.assertEqual(422, response.status_code)
        self.assert_alert(response, 'image')
        self.assertEqual([], self.dispatcher.changes)

    def test_the_deployment_pages_have_the_ids_of_the_contract(self):
        deployment = self.dispatcher.add_deployment(ADMIN, 'building')
        self.login()
        self.dispatcher.add_deployment(ADMIN, 'active')
        response = self.client.get('/dashboard/deployments')
        listed = Page(response.text)
        self.assertIsNotNone(listed.having('data-id', deployment['id']))
        self.assertEqual(2, len(listed.having('data-field', 'state')))
        # The building one's progress (a list's rows come without instances).
        self.assertIn('0 of 1 active, 1 building', response.text)
        form = self.page('/dashboard/deployments/new?cloud=web')
        self.assert_ids(form, 'application', 'cloud', 'count', 'deploy')
        self.assertEqual(['web'], [e[1]['value'] for e in form.elements
                                   if e[0] == 'option' and 'selected' in e[1]
                                   and e[1]['value'] in self.dispatcher.clouds])
        shown = self.page(f'/dashboard/deployments/{deployment["id"]}')
        self.assert_ids(shown, 'deployment', 'instances', 'progress')
        self.assertEqual('true', shown.by_id('deployment')[1]['data-building'])
        self.assertIn('/dashboard/static/deployment.js',
                      [e[1].get('src') for e in shown.elements if e[0] == 'script'])
        progress = self.client.get(f'/dashboard/deployments/{deployment["id"]}/progress.json')
        self.assertEqual(200, progress.status_code)
        self.assertEqual('building', progress.json()['state'])
        self.assertEqual(['building'], [i['state'] for i in progress.json()['instances']])

    def test_a_member_deploys_as_its_owner(self):
        self.login(MEMBER, MEMBER_PASSWORD)
        response = self.post('/dashboard/deployments', {'application': 'hold',
                                                        'cloud': 'web', 'count': '2'})
        self.assertEqual(303, response.status_code, response.text)
        self.assertEqual([('deploy_application', 'hold', 'web', 2, None, MEMBER)],
                         self.dispatcher.changes)
        (deployment_id,) = self.dispatcher.deployments
        self.assertEqual(f'/dashboard/deployments/{deployment_id}',
                         response.headers['location'])

    def test_a_refused_deploy_form_is_shown_again_with_its_values(self):
        self.login()
        response = self.post('/dashboard/deployments', {'application': 'hold',
                                                        'cloud': 'nosuch', 'count': '3'})
        self.assertEqual(404, response.status_code)
        self.assert_alert(response, 'cloud nosuch not found')
        self.assertEqual('3', Page(response.text).by_id('count')[1]['value'])
        response = self.post('/dashboard/deployments', {'application': 'hold',
                                                        'cloud': 'web', 'count': '0'})
        self.assertEqual(422, response.status_code)
        self.assert_alert(response, 'count')
        self.assertEqual([], self.dispatcher.changes)

    def test_the_monitoring_page_has_the_ids_of_the_contract(self):
        self.login()
        page = self.page('/dashboard/monitoring')
        self.assert_ids(page, 'clouds', 'connections', 'updated', 'gateway-status',
                        'chart-connections', 'chart-instances', 'summary')
        self.assertEqual('polite', page.by_id('summary')[1]['aria-live'])
        self.assertEqual(['default', 'web'], [e[1]['data-cloud'] for e in
                                              page.having('data-cloud')])
        fields = [e[1]['data-field'] for e in page.having('data-field')]
        for field in ('users', 'connections', 'available', 'applications_running',
                      'applications_deployed', 'instances_running', 'connection_limit'):
            self.assertEqual(2, fields.count(field), field)
        for field in ('client', 'application', 'instance', 'duration'):
            self.assertEqual(1, fields.count(field), field)
        self.assertIn('1 min 15 s', self.client.get('/dashboard/monitoring').text)
        self.assertEqual('svg', page.by_id('chart-connections')[0])
        self.assertIn('/dashboard/static/monitoring.js',
                      [e[1].get('src') for e in page.elements if e[0] == 'script'])

    def test_a_connection_shows_its_instance_by_name_else_by_id(self):
        self.monitor.connection_list += [
            dict(self.monitor.connection_list[0], client_port=40001, instance='i2',
                 instance_name=None),   # an instance deleted that still holds it
            dict(self.monitor.connection_list[0], client_port=40002, instance=None,
                 instance_name=None)]   # no instance yet
        self.login()
        text = self.client.get('/dashboard/monitoring').text
        self.assertEqual([('i1', 'hold-1'), ('i2', 'i2'), ('', '–')], re.findall(
            r'<td data-field="instance" title="([^"]*)">([^<]*)</td>', text))

    def test_the_monitoring_json_is_for_a_session_only_and_get_only(self):
        anonymous = self.client.get('/dashboard/monitoring.json')
        self.assertEqual(401, anonymous.status_code)
        self.assertEqual(401, anonymous.json()['error']['code'])
        self.login()
        live = self.client.get('/dashboard/monitoring.json')
        self.assertEqual(200, live.status_code)
        self.assertEqual(self.monitor.live()['clouds'], live.json()['clouds'])
        self.assertEqual(self.monitor.connection_list, live.json()['connections'])
        history = self.client.get('/dashboard/history.json')
        self.assertEqual(self.monitor.history(), history.json())
        self.assertEqual(405, self.post('/dashboard/monitoring.json').status_code)

    def test_the_monitoring_json_without_a_gateway_has_no_connections(self):
        def unavailable(cloud=None):
            raise exception.GatewayUnavailable([], 2.0)
        self.monitor.connections = unavailable
        self.login()
        self.assertEqual([], self.client.get('/dashboard/monitoring.json').json()[
            'connections'])
        self.page('/dashboard/monitoring')

    def test_the_monitoring_json_of_a_dispatcher_away_is_a_503_error(self):
        def away():
            raise exception.MessagingError('the dispatcher did not answer')
        self.monitor.live = away
        self.login()
        response = self.client.get('/dashboard/monitoring.json')
        self.assertEqual(503, response.status_code)
        self.assertEqual('the dispatcher did not answer', response.json()['error']['message'])

    def test_the_monitoring_page_without_a_gateway_says_so(self):
        live = self.monitor.live()
        for cloud in live['clouds']:
            cloud.update(users=None, connections=None, available=None)
        live['gateway'] = 'unavailable: no gateway answered'
        self.monitor.live = lambda: live
        self.login()
        page = self.client.get('/dashboard/monitoring').text
        self.assertIn('Connections unknown: the gateway is not answering', page)
        self.assertIn('unavailable: no gateway answered', page)

    def test_a_dispatcher_away_is_a_503_page(self):
        def away(*args, **kwargs):
            raise exception.MessagingError('the dispatcher did not answer')
        self.dispatcher.list_clouds = away
        self.login()
        response = self.client.get('/dashboard/clouds')
        self.assertEqual(503, response.status_code)
        self.assert_alert(response, 'the dispatcher did not answer')

    def test_the_lists_have_a_next_page(self):
        self.conf.set_override('page_size', 1, 'api')
        self.login()
        page = self.page('/dashboard/clouds')
        self.assertEqual(['default'], [e[1]['data-name'] for e in page.having('data-name')])
        (link,) = [e[1]['href'] for e in page.having('rel', 'next')]
        self.assertEqual('/dashboard/clouds?marker=default', link)
        page = self.page(link)
        self.assertEqual(['web'], [e[1]['data-name'] for e in page.having('data-name')])
        self.assertEqual([], page.having('rel', 'next'))
        self.assertEqual(400, self.client.get('/dashboard/clouds?marker=nosuch').status_code)

    # -- escaping

    def test_user_text_cannot_make_markup(self):
        self.dispatcher.add_application('evil', SCRIPT)
        deployment = self.dispatcher.add_deployment(ADMIN, 'error', reason=SCRIPT,
                                                    application='evil')
        self.login()
        for path in ('/dashboard/applications', '/dashboard/applications/evil',
                     '/dashboard/applications/evil/edit',
                     f'/dashboard/deployments/{deployment["id"]}', '/dashboard/monitoring'):
            text = self.client.get(path).text
            self.assertNotIn(SCRIPT, text, path)
            self.assertIn('&lt;script&gt;alert(1)&lt;/script&gt;', text, path)
