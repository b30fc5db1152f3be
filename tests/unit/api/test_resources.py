"""The API's resource routes (clouds, hosts, applications, deployments, snapshots,
images) over a fake dispatcher, a real SQLite Identity and a real file warehouse:
status codes, Location headers, bodies, validation (422 naming the field), roles (401,
403), pagination links, the dispatcher's errors as their statuses."""
import datetime
import logging
import os
import uuid
import warnings

import argon2
import fixtures
import httpx

from tests import base
from vmcloud import exception
from vmcloud.api import app as api_app
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import deployments as api_deployments
from vmcloud.api import images as api_images
from vmcloud.db import api as db_api
from vmcloud.storage import warehouse as warehouse_mod

with warnings.catch_warnings():
    # Starlette would rather its TestClient ran on httpx2; httpx does.
    warnings.simplefilter('ignore')
    from fastapi import testclient

ADMIN, ADMIN_PASSWORD = 'admin', 'admin-password'
MEMBER, MEMBER_PASSWORD = 'member', 'member-password'
OTHER, OTHER_PASSWORD = 'other', 'other-password'
MIB = 1024 * 1024
# Slow on purpose in production; the tests' is cheap.
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _page(rows: list[dict], key: str, limit: int | None, marker: str | None) -> list[dict]:
    """Keyset pagination as the dispatcher's: ``rows`` in the list's order."""
    start = 0
    if marker is not None:
        keys = [row[key] for row in rows]
        if marker not in keys:
            raise exception.MarkerNotFound(marker)
        start = keys.index(marker) + 1
    return rows[start:] if limit is None else rows[start:start + limit]


class FakeDispatcher:
    """Stands in for DispatcherAPI: a few clouds, hosts, applications, deployments and
    snapshots in memory, the dispatcher's answers and errors; ``calls`` records each
    call (method, arguments)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.hosts = {name: {'name': name, 'state': 'up', 'up': True, 'vcpus': 8,
                             'memory_mib': 16384, 'instances': 0, 'vcpus_used': 0,
                             'memory_mib_used': 0}
                      for name in ('host-a', 'host-b')}
        self.clouds = {'default': self._cloud('default', 100, [])}
        self.applications: dict[str, dict] = {}
        self.deployments: dict[str, dict] = {}  # in creation order
        self.snapshots: dict[str, dict] = {}

    def _record(self, method: str, **arguments) -> None:
        self.calls.append((method, arguments))

    def called(self, method: str) -> list[dict]:
        return [arguments for name, arguments in self.calls if name == method]

    @staticmethod
    def _cloud(name: str, limit: int, hosts: list[str]) -> dict:
        return {'name': name, 'connection_limit': limit, 'created_at': _now(),
                'hosts': sorted(hosts), 'deployments': []}

    # -- clouds ---------------------------------------------------------------------

    def list_clouds(self, limit=None, marker=None):
        self._record('list_clouds', limit=limit, marker=marker)
        return _page([self.clouds[n] for n in sorted(self.clouds)], 'name', limit, marker)

    def create_cloud(self, name, connection_limit, hosts=None):
        self._record('create_cloud', name=name, connection_limit=connection_limit,
                     hosts=hosts)
        if name in self.clouds:
            raise exception.NameInUse('cloud', name)
        for host in hosts or []:
            if host not in self.hosts:
                raise exception.HostNotFound(host)
        self.clouds[name] = self._cloud(name, connection_limit, hosts or [])
        return self.clouds[name]

    def show_cloud(self, name):
        self._record('show_cloud', name=name)
        if name not in self.clouds:
            raise exception.CloudNotFound(name)
        return self.clouds[name]

    def update_cloud(self, name, connection_limit=None, add_hosts=None, remove_hosts=None):
        self._record('update_cloud', name=name, connection_limit=connection_limit,
                     add_hosts=add_hosts, remove_hosts=remove_hosts)
        cloud = self.show_cloud(name)
        for host in add_hosts or []:
            if host not in self.hosts:
                raise exception.HostNotFound(host)
        cloud['hosts'] = sorted((set(cloud['hosts']) | set(add_hosts or []))
                                - set(remove_hosts or []))
        if connection_limit is not None:
            cloud['connection_limit'] = connection_limit
        return cloud

    def delete_cloud(self, name):
        self._record('delete_cloud', name=name)
        cloud = self.show_cloud(name)
        if name == 'default':
            raise exception.InUse('cloud', name, 'cannot be deleted: plain deploys use it')
        del self.clouds[name]
        return cloud

    # -- hosts ----------------------------------------------------------------------

    def list_hosts(self, limit=None, marker=None):
        self._record('list_hosts', limit=limit, marker=marker)
        return _page([self.hosts[n] for n in sorted(self.hosts)], 'name', limit, marker)

    def fence_host(self, host):
        self._record('fence_host', host=host)
        if host not in self.hosts:
            raise exception.HostNotFound(host)
        self.hosts[host]['state'] = 'fenced'
        return {'host': host, 'state': 'fenced', 'rebuilt': [], 'failed': []}

    # -- applications ---------------------------------------------------------------

    def list_applications(self, limit=None, marker=None):
        self._record('list_applications', limit=limit, marker=marker)
        return _page([self.applications[n] for n in sorted(self.applications)], 'name',
                     limit, marker)

    def create_application(self, name, image, port, protocol, vcpus=1, memory_mib=256,
                           boot=None, health=None, connection_limit=None):
        self._record('create_application', name=name, image=image, port=port,
                     protocol=protocol, vcpus=vcpus, memory_mib=memory_mib, boot=boot,
                     health=health, connection_limit=connection_limit)
        if name in self.applications:
            raise exception.NameInUse('application', name)
        if image.startswith('missing'):
            raise exception.ImageNotFound(image)
        self.applications[name] = {
            'name': name, 'image': image, 'port': port, 'protocol': protocol,
            'vcpus': vcpus, 'memory_mib': memory_mib, 'boot': boot or {},
            'health': health or {'kind': 'marker'}, 'connection_limit': connection_limit,
            'created_at': _now(), 'deployments': []}
        return self.applications[name]

    def show_application(self, name):
        self._record('show_application', name=name)
        if name not in self.applications:
            raise exception.ApplicationNotFound(name)
        return self.applications[name]

    def update_application(self, name, changes):
        self._record('update_application', name=name, changes=changes)
        application = self.show_application(name)
        application.update(changes)
        return application

    def delete_application(self, name):
        self._record('delete_application', name=name)
        application = self.show_application(name)
        if application['deployments']:
            raise exception.InUse('application', name, 'is deployed')
        del self.applications[name]
        return application

    # -- deployments ----------------------------------------------------------------

    def _deployment(self, image, count, cloud, owner, application=None) -> dict:
        if cloud not in self.clouds:
            raise exception.CloudNotFound(cloud)
        deployment_id = str(uuid.uuid4())
        deployment = {
            'id': deployment_id, 'image': image, 'count': count, 'min_count': count,
            'state': 'building', 'reason': '', 'cloud': cloud, 'application': application,
            'owner': owner, 'listener_port': None, 'created_at': _now(),
            'instances': [{'id': str(uuid.uuid4()), 'name': f'vm-{deployment_id[:8]}-{i}',
                           'state': 'building', 'host': 'host-a'} for i in range(count)]}
        self.deployments[deployment_id] = deployment
        return deployment

    def deploy(self, image, count, min_count=None, vcpus=1, memory_mib=256, boot=None,
               health=None, cloud='default', port=None, protocol=None, owner=None):
        self._record('deploy', image=image, count=count, min_count=min_count, vcpus=vcpus,
                     memory_mib=memory_mib, boot=boot, health=health, cloud=cloud,
                     port=port, protocol=protocol, owner=owner)
        return self._deployment(image, count, cloud, owner)

    def deploy_application(self, application, cloud, count, min_count=None, owner=None):
        self._record('deploy_application', application=application, cloud=cloud,
                     count=count, min_count=min_count, owner=owner)
        app = self.show_application(application)
        return self._deployment(app['image'], count, cloud, owner, application)

    def deploy_snapshot(self, snapshot_id, boot=None, allow_partial=False, owner=None):
        self._record('deploy_snapshot', snapshot_id=snapshot_id, boot=boot,
                     allow_partial=allow_partial, owner=owner)
        self.show_snapshot(snapshot_id)
        return self._deployment('snap', 1, 'default', owner)

    def list_deployments(self, limit=None, marker=None, cloud=None, owner=None):
        self._record('list_deployments', limit=limit, marker=marker, cloud=cloud,
                     owner=owner)
        rows = [{k: v for k, v in d.items() if k != 'instances'}
                for d in reversed(list(self.deployments.values()))
                if (cloud is None or d['cloud'] == cloud)
                and (owner is None or d['owner'] == owner)]
        return _page(rows, 'id', limit, marker)

    def show_deployment(self, deployment_id):
        self._record('show_deployment', deployment_id=deployment_id)
        if deployment_id not in self.deployments:
            raise exception.DeploymentNotFound(deployment_id)
        return self.deployments[deployment_id]

    def delete_deployment(self, deployment_id):
        self._record('delete_deployment', deployment_id=deployment_id)
        deployment = self.show_deployment(deployment_id)
        deployment['state'] = 'deleted'
        for instance in deployment['instances']:
            instance['state'] = 'deleting'
        return deployment

    # -- snapshots ------------------------------------------------------------------

    def snapshot(self, deployment_id):
        self._record('snapshot', deployment_id=deployment_id)
        self.show_deployment(deployment_id)
        snapshot = {'id': str(uuid.uuid4()), 'deployment_id': deployment_id,
                    'state': 'uploading', 'reason': '', 'created_at': _now()}
        self.snapshots[snapshot['id']] = snapshot
        return snapshot

    def list_snapshots(self, deployment_id=None, limit=None, marker=None):
        self._record('list_snapshots', deployment_id=deployment_id, limit=limit,
                     marker=marker)
        if deployment_id is not None:
            self.show_deployment(deployment_id)
        rows = [s for s in reversed(list(self.snapshots.values()))
                if deployment_id is None or s['deployment_id'] == deployment_id]
        return _page(rows, 'id', limit, marker)

    def show_snapshot(self, snapshot_id):
        self._record('show_snapshot', snapshot_id=snapshot_id)
        if snapshot_id not in self.snapshots:
            raise exception.SnapshotNotFound(snapshot_id)
        return dict(self.snapshots[snapshot_id], items=[])


class ApiTestCase(base.TestCase):
    """make_app over ``dispatcher`` (a FakeDispatcher by default), a real Identity on
    SQLite with an admin and two members, and a real file warehouse; ``client`` has no
    token, ``admin``, ``member`` and ``other`` have theirs."""

    def make_dispatcher(self):
        return FakeDispatcher()

    def make_monitor(self):
        return None

    def setUp(self):
        super().setUp()
        self.log = self.useFixture(fixtures.FakeLogger(level=logging.INFO))
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/vmcloud.sqlite',
                               'database')
        database = db_api.Database(self.conf)
        database.upgrade()
        self.addCleanup(database.dispose)
        self.identity = auth.Identity(self.conf, database, hasher=FAST_HASHER)
        for name, password, role in ((ADMIN, ADMIN_PASSWORD, 'admin'),
                                     (MEMBER, MEMBER_PASSWORD, 'member'),
                                     (OTHER, OTHER_PASSWORD, 'member')):
            self.identity.create_user(name, password, role)
        self.dispatcher = self.make_dispatcher()
        self.warehouse = warehouse_mod.Warehouse(self.conf)
        self.services = context.Services(conf=self.conf, dispatcher=self.dispatcher,
                                         identity=self.identity,
                                         warehouse=lambda: self.warehouse,
                                         monitor=self.make_monitor())
        self.app = api_app.make_app(self.services)
        self.client = self.make_client()
        self.admin = self.make_client(ADMIN, ADMIN_PASSWORD)
        self.member = self.make_client(MEMBER, MEMBER_PASSWORD)
        self.other = self.make_client(OTHER, OTHER_PASSWORD)

    def make_client(self, name: str | None = None,
                    password: str | None = None) -> testclient.TestClient:
        headers = {}
        if name is not None:
            headers['X-Auth-Token'] = self.identity.login(name, password, 'testclient')['id']
        client = testclient.TestClient(self.app, raise_server_exceptions=False,
                                       headers=headers)
        self.addCleanup(client.close)
        return client

    def assert_error(self, status: int, response: httpx.Response, *fragments: str) -> str:
        """``response`` is an error of ``status`` in the API's form whose message holds
        every fragment. :returns: the message."""
        self.assertEqual(status, response.status_code, response.text)
        error = response.json()['error']
        self.assertEqual(status, error['code'])
        for fragment in fragments:
            self.assertIn(fragment, error['message'])
        return error['message']

    def assert_ok(self, status: int, response: httpx.Response) -> dict:
        self.assertEqual(status, response.status_code, response.text)
        return response.json()


class CloudsTest(ApiTestCase):

    def setUp(self):
        super().setUp()
        for name in ('alpha', 'beta', 'gamma'):
            self.dispatcher.create_cloud(name, 10)
        self.dispatcher.calls.clear()

    def test_a_list_comes_in_pages_with_next_links_until_the_last(self):
        body = self.assert_ok(200, self.member.get('/v1/clouds', params={'limit': 2}))
        self.assertEqual(['alpha', 'beta'], [c['name'] for c in body['clouds']])
        self.assertEqual([{'rel': 'next', 'href': '/v1/clouds?limit=2&marker=beta'}],
                         body['clouds_links'])
        # One more than shown: whether a next page exists.
        self.assertEqual([{'limit': 3, 'marker': None}], self.dispatcher.called('list_clouds'))
        body = self.assert_ok(200, self.member.get(body['clouds_links'][0]['href']))
        self.assertEqual(['default', 'gamma'], [c['name'] for c in body['clouds']])
        self.assertEqual([], body['clouds_links'])

    def test_the_default_page_size_and_its_limits(self):
        self.conf.set_override('page_size', 3, 'api')
        self.conf.set_override('max_page_size', 5, 'api')
        body = self.assert_ok(200, self.member.get('/v1/clouds'))
        self.assertEqual(3, len(body['clouds']))
        self.assertEqual('/v1/clouds?limit=3&marker=default', body['clouds_links'][0]['href'])
        self.assert_error(422, self.member.get('/v1/clouds?limit=6'), 'limit')
        self.assert_error(422, self.member.get('/v1/clouds?limit=0'), 'limit')

    def test_an_unknown_marker_is_400(self):
        self.assert_error(400, self.member.get('/v1/clouds?marker=nothing'), 'nothing')

    def test_every_route_needs_a_token(self):
        for method, path in (('GET', '/v1/clouds'), ('POST', '/v1/clouds'),
                             ('GET', '/v1/clouds/alpha'), ('PATCH', '/v1/clouds/alpha'),
                             ('DELETE', '/v1/clouds/alpha'),
                             ('PUT', '/v1/clouds/alpha/hosts/host-a'),
                             ('GET', '/v1/hosts'), ('GET', '/v1/applications'),
                             ('GET', '/v1/deployments'), ('POST', '/v1/deployments'),
                             ('GET', '/v1/snapshots'), ('GET', '/v1/images'),
                             ('PUT', '/v1/images/x/file')):
            response = self.client.request(method, path)
            self.assert_error(401, response)
            self.assertEqual('Token', response.headers['WWW-Authenticate'])
        self.assertEqual([], self.dispatcher.calls)

    def test_an_admin_creates_one_201_with_its_location(self):
        response = self.admin.post('/v1/clouds', json={'name': 'delta', 'connection_limit': 5,
                                                       'hosts': ['host-b', 'host-a']})
        body = self.assert_ok(201, response)
        self.assertEqual('/v1/clouds/delta', response.headers['Location'])
        self.assertEqual({'name': 'delta', 'connection_limit': 5,
                          'hosts': ['host-a', 'host-b'], 'deployments': []},
                         {k: v for k, v in body['cloud'].items() if k != 'created_at'})
        self.assertEqual([{'name': 'delta', 'connection_limit': 5,
                           'hosts': ['host-b', 'host-a']}],
                         self.dispatcher.called('create_cloud'))

    def test_a_member_only_reads(self):
        self.assert_error(403, self.member.post('/v1/clouds', json={
            'name': 'delta', 'connection_limit': 5}), 'admin')
        self.assert_error(403, self.member.patch('/v1/clouds/alpha',
                                                 json={'connection_limit': 1}))
        self.assert_error(403, self.member.delete('/v1/clouds/alpha'))
        self.assert_error(403, self.member.put('/v1/clouds/alpha/hosts/host-a'))
        self.assert_error(403, self.member.delete('/v1/clouds/alpha/hosts/host-a'))
        self.assertEqual([], self.dispatcher.calls)
        body = self.assert_ok(200, self.member.get('/v1/clouds/alpha'))
        self.assertEqual('alpha', body['cloud']['name'])

    def test_a_body_that_does_not_validate_is_422_naming_the_field(self):
        for body, field in (({'name': 'Bad_Name', 'connection_limit': 5}, 'body.name'),
                            ({'name': 'x' * 33, 'connection_limit': 5}, 'body.name'),
                            ({'name': 'ok', 'connection_limit': 0}, 'body.connection_limit'),
                            ({'name': 'ok', 'connection_limit': '5'},
                             'body.connection_limit'),
                            ({'name': 'ok', 'connection_limit': True},
                             'body.connection_limit'),
                            ({'name': 'ok'}, 'body.connection_limit'),
                            ({'name': 'ok', 'connection_limit': 5, 'colour': 'red'},
                             'body.colour'),
                            ({'name': 'ok', 'connection_limit': 5, 'hosts': 'host-a'},
                             'body.hosts')):
            self.assert_error(422, self.admin.post('/v1/clouds', json=body), field)
        self.assert_error(422, self.admin.post('/v1/clouds', content=b'{"name": ',
                                               headers={'Content-Type': 'application/json'}),
                          'JSON')
        self.assertEqual([], self.dispatcher.calls)

    def test_the_dispatcher_errors_are_their_statuses(self):
        self.assert_error(409, self.admin.post('/v1/clouds', json={
            'name': 'alpha', 'connection_limit': 5}), 'cloud alpha exists already')
        self.assert_error(404, self.admin.post('/v1/clouds', json={
            'name': 'delta', 'connection_limit': 5, 'hosts': ['nowhere']}), 'nowhere')
        self.assert_error(404, self.member.get('/v1/clouds/nothing'), 'cloud nothing')
        self.assert_error(409, self.admin.delete('/v1/clouds/default'), 'default')

    def test_patch_changes_the_limit(self):
        body = self.assert_ok(200, self.admin.patch('/v1/clouds/alpha',
                                                    json={'connection_limit': 7}))
        self.assertEqual(7, body['cloud']['connection_limit'])
        self.assert_error(422, self.admin.patch('/v1/clouds/alpha', json={'hosts': []}),
                          'body.hosts')

    def test_delete_is_204(self):
        response = self.admin.delete('/v1/clouds/alpha')
        self.assertEqual(204, response.status_code, response.text)
        self.assertEqual(b'', response.content)
        self.assert_error(404, self.member.get('/v1/clouds/alpha'))

    def test_hosts_are_assigned_and_unassigned(self):
        body = self.assert_ok(200, self.admin.put('/v1/clouds/alpha/hosts/host-a'))
        self.assertEqual(['host-a'], body['cloud']['hosts'])
        self.assertEqual({'name': 'alpha', 'connection_limit': None, 'add_hosts': ['host-a'],
                          'remove_hosts': None}, self.dispatcher.called('update_cloud')[-1])
        self.assert_error(404, self.admin.put('/v1/clouds/alpha/hosts/nowhere'), 'nowhere')
        response = self.admin.delete('/v1/clouds/alpha/hosts/host-a')
        self.assertEqual(204, response.status_code, response.text)
        self.assertEqual([], self.dispatcher.clouds['alpha']['hosts'])
        self.assert_error(404, self.admin.put('/v1/clouds/nothing/hosts/host-a'))


class HostsTest(ApiTestCase):

    def test_list_show_fence(self):
        body = self.assert_ok(200, self.member.get('/v1/hosts?limit=1'))
        self.assertEqual(['host-a'], [h['name'] for h in body['hosts']])
        self.assertEqual('/v1/hosts?limit=1&marker=host-a', body['hosts_links'][0]['href'])
        body = self.assert_ok(200, self.member.get('/v1/hosts/host-b'))
        self.assertEqual({'name': 'host-b', 'state': 'up', 'up': True, 'vcpus': 8,
                          'memory_mib': 16384, 'instances': 0, 'vcpus_used': 0,
                          'memory_mib_used': 0}, body['host'])
        self.assert_error(404, self.member.get('/v1/hosts/nowhere'), 'nowhere')
        self.assert_error(403, self.member.post('/v1/hosts/host-a/fence'))
        body = self.assert_ok(200, self.admin.post('/v1/hosts/host-a/fence'))
        self.assertEqual({'host': 'host-a', 'state': 'fenced', 'rebuilt': [], 'failed': []},
                         body['fence'])
        self.assert_error(404, self.admin.post('/v1/hosts/nowhere/fence'))


APPLICATION = {'name': 'web', 'image': 'cirros:2', 'port': 80, 'protocol': 'http'}


class ApplicationsTest(ApiTestCase):

    def test_create_with_the_defaults(self):
        response = self.admin.post('/v1/applications', json=APPLICATION)
        body = self.assert_ok(201, response)
        self.assertEqual('/v1/applications/web', response.headers['Location'])
        self.assertEqual('web', body['application']['name'])
        self.assertEqual([dict(APPLICATION, vcpus=1, memory_mib=256, boot={}, health=None,
                               connection_limit=None)],
                         self.dispatcher.called('create_application'))

    def test_create_with_everything(self):
        self.assert_ok(201, self.admin.post('/v1/applications', json=dict(
            APPLICATION, vcpus=2, memory_mib=512, connection_limit=50,
            boot={'kernel': 'vmlinuz:1', 'cmdline': 'console=ttyS0 id={name}'},
            health={'kind': 'http', 'port': 8080, 'timeout': 30})))
        call = self.dispatcher.called('create_application')[0]
        self.assertEqual({'kernel': 'vmlinuz:1', 'cmdline': 'console=ttyS0 id={name}'},
                         call['boot'])
        # The path the dispatcher would default to, said here.
        self.assertEqual({'kind': 'http', 'port': 8080, 'path': '/', 'timeout': 30.0},
                         call['health'])
        self.assertEqual((2, 512, 50),
                         (call['vcpus'], call['memory_mib'], call['connection_limit']))

    def test_each_health_check_shape(self):
        for name, health in (('marker', {'kind': 'marker'}), ('tcp', {'kind': 'tcp', 'port': 22}),
                             ('console', {'kind': 'console', 'pattern': 'login:'})):
            self.assert_ok(201, self.admin.post('/v1/applications', json=dict(
                APPLICATION, name=name, health=health)))
            self.assertEqual(health, self.dispatcher.called('create_application')[-1]['health'])

    def test_a_body_that_does_not_validate_is_422_naming_the_field(self):
        for change, field in (({'name': 'Web'}, 'body.name'),
                              ({'image': 'bad image'}, 'body.image'),
                              ({'image': 'cirros:v2'}, 'body.image'),
                              ({'port': 0}, 'body.port'),
                              ({'port': 65536}, 'body.port'),
                              ({'protocol': 'udp'}, 'body.protocol'),
                              ({'vcpus': 0}, 'body.vcpus'),
                              ({'memory_mib': 1.5}, 'body.memory_mib'),
                              ({'boot': {'kernel': 'k', 'append': 'x'}}, 'body.boot.append'),
                              ({'health': {'kind': 'smoke'}}, 'body.health'),
                              ({'health': {'kind': 'tcp'}}, 'body.health.tcp.port'),
                              ({'health': {'kind': 'marker', 'port': 1}},
                               'body.health.marker.port'),
                              ({'health': {'kind': 'http', 'port': 80, 'path': 'no-slash'}},
                               'body.health.http.path'),
                              ({'health': {'kind': 'console', 'pattern': '('}},
                               'body.health.console.pattern'),
                              ({'health': {'kind': 'tcp', 'port': 22, 'timeout': 0}},
                               'body.health.tcp.timeout'),
                              ({'connection_limit': 0}, 'body.connection_limit')):
            self.assert_error(422, self.admin.post('/v1/applications',
                                                   json=dict(APPLICATION, **change)), field)
        self.assertEqual([], self.dispatcher.calls)

    def test_the_dispatcher_errors_are_their_statuses(self):
        self.assert_ok(201, self.admin.post('/v1/applications', json=APPLICATION))
        self.assert_error(409, self.admin.post('/v1/applications', json=APPLICATION), 'web')
        self.assert_error(404, self.admin.post('/v1/applications', json=dict(
            APPLICATION, name='other', image='missing')), 'image missing')
        self.assert_error(404, self.member.get('/v1/applications/nothing'))
        self.assert_error(403, self.member.post('/v1/applications',
                                                json=dict(APPLICATION, name='mine')))

    def test_patch_sends_only_the_fields_given(self):
        self.dispatcher.create_application(**APPLICATION, connection_limit=5)
        body = self.assert_ok(200, self.admin.patch('/v1/applications/web', json={
            'image': 'cirros:3', 'health': {'kind': 'tcp', 'port': 80}}))
        self.assertEqual('cirros:3', body['application']['image'])
        self.assertEqual({'name': 'web', 'changes': {'image': 'cirros:3',
                                                     'health': {'kind': 'tcp', 'port': 80}}},
                         self.dispatcher.called('update_application')[-1])
        self.assert_ok(200, self.admin.patch('/v1/applications/web',
                                             json={'connection_limit': None}))
        self.assertEqual({'connection_limit': None},
                         self.dispatcher.called('update_application')[-1]['changes'])
        self.assert_error(422, self.admin.patch('/v1/applications/web', json={'image': None}),
                          'image cannot be null')
        self.assert_error(422, self.admin.patch('/v1/applications/web', json={'name': 'x'}),
                          'body.name')
        self.assert_error(403, self.member.patch('/v1/applications/web', json={'vcpus': 2}))
        self.assert_error(404, self.admin.patch('/v1/applications/nothing',
                                                json={'vcpus': 2}))
        # Nothing to change: the application as it is.
        calls = len(self.dispatcher.called('update_application'))
        self.assertEqual('web', self.assert_ok(200, self.admin.patch(
            '/v1/applications/web', json={}))['application']['name'])
        self.assertEqual(calls, len(self.dispatcher.called('update_application')))

    def test_list_and_delete(self):
        for name in ('b', 'a', 'c'):
            self.dispatcher.create_application(**dict(APPLICATION, name=name))
        body = self.assert_ok(200, self.member.get('/v1/applications?limit=2'))
        self.assertEqual(['a', 'b'], [a['name'] for a in body['applications']])
        self.assertEqual('/v1/applications?limit=2&marker=b',
                         body['applications_links'][0]['href'])
        self.assertEqual(204, self.admin.delete('/v1/applications/a').status_code)
        self.dispatcher.applications['b']['deployments'] = ['d1']
        self.assert_error(409, self.admin.delete('/v1/applications/b'), 'deployed')
        self.assert_error(403, self.member.delete('/v1/applications/c'))


class DeploymentsTest(ApiTestCase):

    def setUp(self):
        super().setUp()
        self.dispatcher.create_application(**APPLICATION)
        self.dispatcher.create_cloud('edge', 10)
        self.dispatcher.calls.clear()

    def deploy(self, client, status=202, **body) -> dict:
        return self.assert_ok(status, client.post('/v1/deployments', json=body))['deployment']

    def test_a_member_deploys_an_application_and_owns_it(self):
        response = self.member.post('/v1/deployments', json={
            'application': 'web', 'cloud': 'edge', 'count': 3, 'min_count': 2})
        deployment = self.assert_ok(202, response)['deployment']
        self.assertEqual(f'/v1/deployments/{deployment["id"]}', response.headers['Location'])
        self.assertEqual(MEMBER, deployment['owner'])
        self.assertEqual({'total': 3, 'building': 3, 'active': 0, 'unknown': 0, 'error': 0,
                          'deleting': 0, 'deleted': 0}, deployment['progress'])
        self.assertEqual([{'application': 'web', 'cloud': 'edge', 'count': 3,
                           'min_count': 2, 'owner': MEMBER}],
                         self.dispatcher.called('deploy_application'))

    def test_the_cloud_defaults_to_default(self):
        self.deploy(self.admin, application='web', count=1)
        self.assertEqual('default', self.dispatcher.called('deploy_application')[0]['cloud'])

    def test_a_member_may_not_boot_host_files_nor_set_a_console_pattern(self):
        for body, fragment in (
                ({'image': 'cirros', 'count': 1, 'boot': {'initrd': '/etc/shadow'}},
                 '/etc/shadow'),
                ({'image': 'cirros', 'count': 1, 'boot': {'kernel': '/boot/vmlinuz'}},
                 'warehouse images'),
                ({'snapshot': 'snap-1', 'boot': {'kernel': '/boot/vmlinuz'}}, 'only an admin'),
                ({'image': 'cirros', 'count': 1,
                  'health': {'kind': 'console', 'pattern': '(a+)+$'}}, 'console')):
            self.assert_error(403, self.member.post('/v1/deployments', json=body), fragment)
        self.assertEqual([], self.dispatcher.calls)
        # Warehouse images as kernel and initrd are a member's to name.
        self.deploy(self.member, image='cirros', count=1,
                    boot={'kernel': 'vmlinuz:1', 'initrd': 'initrd'})

    def test_an_image_with_its_size_boot_health_and_service(self):
        self.deploy(self.admin, image='cirros', count=2, vcpus=2, memory_mib=128,
                    boot={'kernel': '/boot/vmlinuz'}, health={'kind': 'tcp', 'port': 22},
                    port=80, protocol='http', cloud='edge')
        self.assertEqual([{'image': 'cirros', 'count': 2, 'min_count': None, 'vcpus': 2,
                           'memory_mib': 128, 'boot': {'kernel': '/boot/vmlinuz'},
                           'health': {'kind': 'tcp', 'port': 22}, 'cloud': 'edge',
                           'port': 80, 'protocol': 'http', 'owner': ADMIN}],
                         self.dispatcher.called('deploy'))
        self.deploy(self.member, image='cirros:1', count=1)
        self.assertEqual({'image': 'cirros:1', 'count': 1, 'min_count': None, 'vcpus': 1,
                          'memory_mib': 256, 'boot': {}, 'health': None, 'cloud': 'default',
                          'port': None, 'protocol': None, 'owner': MEMBER},
                         self.dispatcher.called('deploy')[-1])

    def test_a_snapshot(self):
        source = self.dispatcher.deploy('cirros', 1)
        snapshot = self.dispatcher.snapshot(source['id'])
        self.deploy(self.member, snapshot=snapshot['id'])
        self.deploy(self.member, snapshot=snapshot['id'], allow_partial=True)
        self.assertEqual([{'snapshot_id': snapshot['id'], 'boot': None,
                           'allow_partial': partial, 'owner': MEMBER}
                          for partial in (False, True)],
                         self.dispatcher.called('deploy_snapshot'))
        self.assert_error(404, self.member.post('/v1/deployments', json={'snapshot': 'nothing'}),
                          'snapshot nothing')

    def test_exactly_one_way_of_deploying_each_with_its_own_fields(self):
        for body, fragment in (
                ({'count': 1}, 'exactly one of application, image or snapshot (got none)'),
                ({'application': 'web', 'image': 'cirros', 'count': 1},
                 'exactly one of application, image or snapshot (got application, image)'),
                ({'application': 'web', 'count': 1, 'vcpus': 2},
                 'a deployment of an application takes no vcpus'),
                ({'snapshot': 's', 'count': 1}, 'a deployment of a snapshot takes no count'),
                ({'snapshot': 's', 'cloud': 'edge'}, 'takes no cloud'),
                ({'image': 'cirros', 'count': 1, 'allow_partial': True},
                 'takes no allow_partial'),
                ({'application': 'web'}, 'a deployment of an application needs a count'),
                ({'image': 'cirros', 'count': 2, 'min_count': 3}, 'min_count 3 is above count 2'),
                ({'image': 'cirros', 'count': 1, 'port': 80}, 'both a port and a protocol'),
                ({'application': 'web', 'count': 0}, 'body.count'),
                ({'application': 'web', 'count': 1001}, 'body.count'),
                ({'application': 'web', 'count': 1, 'cloud': 'Edge'}, 'body.cloud'),
                ({'application': 'web', 'count': 1, 'owner': 'someone'}, 'body.owner')):
            self.assert_error(422, self.member.post('/v1/deployments', json=body), fragment)
        self.assertEqual([], self.dispatcher.calls)

    def test_the_dashboards_form_validates_the_same(self):
        body = api_deployments.DeploymentCreate.model_validate(
            {'application': 'web', 'cloud': 'edge', 'count': 2})
        deployment = api_deployments.create(self.services, auth.User(OTHER, 'member'), body)
        self.assertEqual(OTHER, deployment['owner'])

    def test_the_dispatcher_errors_are_their_statuses(self):
        self.assert_error(404, self.member.post('/v1/deployments', json={
            'application': 'nothing', 'count': 1}), 'application nothing')
        self.assert_error(404, self.member.post('/v1/deployments', json={
            'application': 'web', 'count': 1, 'cloud': 'nowhere'}), 'cloud nowhere')
        self.assert_error(404, self.member.get('/v1/deployments/nothing'))

    def test_show_counts_the_instances_by_state(self):
        deployment = self.dispatcher.deploy('cirros', 4)
        for instance, state in zip(deployment['instances'],
                                   ('active', 'active', 'error', 'building')):
            instance['state'] = state
        shown = self.assert_ok(200, self.member.get(f'/v1/deployments/{deployment["id"]}'))
        self.assertEqual({'total': 4, 'building': 1, 'active': 2, 'unknown': 0, 'error': 1,
                          'deleting': 0, 'deleted': 0}, shown['deployment']['progress'])
        self.assertEqual(4, len(shown['deployment']['instances']))
        # Passed on as the dispatcher shows it, fields the models do not name too.
        self.assertEqual(deployment['instances'][0], shown['deployment']['instances'][0])

    def test_only_its_owner_or_an_admin_deletes_it(self):
        mine = self.deploy(self.member, application='web', count=1)
        self.assert_error(403, self.other.delete(f'/v1/deployments/{mine["id"]}'),
                          f'deployment {mine["id"]} is not user {OTHER}\'s')
        self.assertEqual([], self.dispatcher.called('delete_deployment'))
        deleted = self.assert_ok(202, self.member.delete(f'/v1/deployments/{mine["id"]}'))
        self.assertEqual('deleted', deleted['deployment']['state'])
        self.assertEqual(1, deleted['deployment']['progress']['deleting'])
        theirs = self.deploy(self.other, application='web', count=1)
        self.assert_ok(202, self.admin.delete(f'/v1/deployments/{theirs["id"]}'))
        # One of before the API (no owner): an admin's alone.
        ownerless = self.dispatcher.deploy('cirros', 1)
        self.assert_error(403, self.member.delete(f'/v1/deployments/{ownerless["id"]}'))
        self.assert_error(404, self.admin.delete('/v1/deployments/nothing'))

    def test_check_can_delete(self):
        deployment = {'id': 'd', 'owner': MEMBER}
        api_deployments.check_can_delete(auth.User(MEMBER, 'member'), deployment)
        api_deployments.check_can_delete(auth.User(ADMIN, 'admin'), deployment)
        self.assertRaises(exception.Forbidden, api_deployments.check_can_delete,
                          auth.User(OTHER, 'member'), deployment)
        self.assertRaises(exception.Forbidden, api_deployments.check_can_delete,
                          auth.User(OTHER, 'member'), {'id': 'd', 'owner': None})

    def test_the_list_is_newest_first_in_pages_keeping_the_filters(self):
        made = [self.deploy(self.member, application='web', count=1, cloud='edge')['id']
                for _ in range(3)]
        self.deploy(self.member, application='web', count=1)
        self.dispatcher.calls.clear()
        body = self.assert_ok(200, self.member.get('/v1/deployments',
                                                   params={'cloud': 'edge', 'limit': 2}))
        self.assertEqual(made[:0:-1], [d['id'] for d in body['deployments']])
        self.assertNotIn('progress', body['deployments'][0])
        self.assertEqual(f'/v1/deployments?cloud=edge&limit=2&marker={made[1]}',
                         body['deployments_links'][0]['href'])
        self.assertEqual({'limit': 3, 'marker': None, 'cloud': 'edge', 'owner': None},
                         self.dispatcher.called('list_deployments')[0])
        body = self.assert_ok(200, self.member.get(body['deployments_links'][0]['href']))
        self.assertEqual([made[0]], [d['id'] for d in body['deployments']])
        self.assertEqual([], body['deployments_links'])
        self.assert_ok(200, self.member.get('/v1/deployments', params={'owner': OTHER}))
        self.assertEqual(OTHER, self.dispatcher.called('list_deployments')[-1]['owner'])
        self.assert_error(400, self.member.get('/v1/deployments?marker=nothing'))

    def test_an_admin_snapshots_one(self):
        deployment = self.dispatcher.deploy('cirros', 1)
        path = f'/v1/deployments/{deployment["id"]}/snapshots'
        self.assert_error(403, self.member.post(path))
        response = self.admin.post(path)
        snapshot = self.assert_ok(202, response)['snapshot']
        self.assertEqual(deployment['id'], snapshot['deployment_id'])
        self.assertEqual(f'/v1/snapshots/{snapshot["id"]}', response.headers['Location'])
        self.assert_error(404, self.admin.post('/v1/deployments/nothing/snapshots'))


class SnapshotsTest(ApiTestCase):

    def test_list_and_show(self):
        first = self.dispatcher.deploy('cirros', 1)
        second = self.dispatcher.deploy('cirros', 1)
        made = [self.dispatcher.snapshot(d['id'])['id'] for d in (first, first, second)]
        body = self.assert_ok(200, self.member.get('/v1/snapshots?limit=2'))
        self.assertEqual([made[2], made[1]], [s['id'] for s in body['snapshots']])
        self.assertEqual(f'/v1/snapshots?limit=2&marker={made[1]}',
                         body['snapshots_links'][0]['href'])
        body = self.assert_ok(200, self.member.get('/v1/snapshots',
                                                   params={'deployment': first['id']}))
        self.assertEqual([made[1], made[0]], [s['id'] for s in body['snapshots']])
        self.assert_error(404, self.member.get('/v1/snapshots?deployment=nothing'))
        body = self.assert_ok(200, self.member.get(f'/v1/snapshots/{made[0]}'))
        self.assertEqual({'id': made[0], 'deployment_id': first['id'], 'items': []},
                         {k: body['snapshot'][k] for k in ('id', 'deployment_id', 'items')})
        self.assert_error(404, self.member.get('/v1/snapshots/nothing'), 'snapshot nothing')


class ImagesTest(ApiTestCase):

    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', 64 * 1024, 'storage')
        self.scratch = self.warehouse.backend.scratch_dir()

    def raw(self, size: int = 256 * 1024) -> bytes:
        return bytes(range(256)) * (size // 256)

    def upload(self, client, name: str, data: bytes, **params) -> httpx.Response:
        return client.put(f'/v1/images/{name}/file', content=data, params=params,
                          headers={'Content-Type': 'application/octet-stream'})

    def leftovers(self) -> list[str]:
        return [n for n in os.listdir(self.scratch) if n.startswith(api_images.UPLOAD_PREFIX)]

    def test_an_upload_is_stored_and_shown(self):
        response = self.upload(self.admin, 'cirros', self.raw(), format='raw')
        image = self.assert_ok(201, response)['image']
        self.assertEqual('/v1/images/cirros', response.headers['Location'])
        self.assertEqual({'image': 'cirros', 'version': 1, 'parent': None, 'size': 256 * 1024,
                          'chunk_size': 64 * 1024, 'data_chunks': 4, 'holes': 0},
                         {k: image[k] for k in ('image', 'version', 'parent', 'size',
                                                'chunk_size', 'data_chunks', 'holes')})
        self.assertGreater(image['stored_bytes'], 0)
        self.assertEqual(self.raw(), self.warehouse.read(self.warehouse.lookup('cirros'),
                                                         0, 256 * 1024))
        self.assertEqual([], self.leftovers())
        shown = self.assert_ok(200, self.member.get('/v1/images/cirros'))['image']
        self.assertEqual(('cirros', 1, 256 * 1024, []),
                         (shown['name'], shown['latest'], shown['size'], shown['damaged']))
        self.assertEqual([1], [v['version'] for v in shown['versions']])

    def test_the_list_has_every_image_latest_version_first(self):
        for name in ('b', 'a', 'c'):
            self.assert_ok(201, self.upload(self.admin, name, self.raw()))
        self.warehouse.snapshot_chunks(self.warehouse.lookup('a').ref, {0: b'x' * 65536})
        body = self.assert_ok(200, self.member.get('/v1/images?limit=2'))
        self.assertEqual(['a', 'b'], [i['name'] for i in body['images']])
        self.assertEqual([2, 1], [v['version'] for v in body['images'][0]['versions']])
        self.assertEqual('a:1', body['images'][0]['versions'][0]['parent'])
        self.assertEqual(2, body['images'][0]['latest'])
        self.assertEqual('/v1/images?limit=2&marker=b', body['images_links'][0]['href'])
        body = self.assert_ok(200, self.member.get(body['images_links'][0]['href']))
        self.assertEqual(['c'], [i['name'] for i in body['images']])
        self.assert_error(400, self.member.get('/v1/images?marker=nothing'))

    def test_unknown_and_badly_named_images(self):
        self.assert_error(404, self.member.get('/v1/images/nothing'), 'image nothing')
        self.assert_error(422, self.member.get('/v1/images/.hidden'), 'name')
        self.assert_error(422, self.upload(self.admin, '-x', self.raw()), 'name')

    def test_an_image_that_exists_is_409_before_its_body_is_read(self):
        self.assert_ok(201, self.upload(self.admin, 'cirros', self.raw()))
        self.assert_error(409, self.upload(self.admin, 'cirros', self.raw()),
                          'image cirros already exists')
        self.assertEqual([], self.leftovers())

    def test_an_image_refused_by_inspection_is_422_and_nothing_is_stored(self):
        message = self.assert_error(422, self.upload(self.admin, 'fake', b'QFI\xfb' + b'\0' * 1020,
                                                     format='raw'), 'upload of fake')
        self.assertNotIn(api_images.UPLOAD_PREFIX, message)  # not the server's path
        self.assert_error(422, self.upload(self.admin, 'empty', b''), 'empty')
        self.assert_error(422, self.upload(self.admin, 'fake', self.raw(), format='vhd'),
                          'format')
        self.assertEqual([], self.warehouse.images())
        self.assertEqual([], self.leftovers())

    def test_a_body_over_max_image_bytes_is_413_and_nothing_is_left(self):
        self.conf.set_override('max_image_bytes', MIB, 'api')
        self.conf.set_override('max_body_bytes', 64 * 1024, 'api')
        self.assert_error(413, self.upload(self.admin, 'big', b'\1' * (MIB + 512)),
                          'max_image_bytes')

        def chunks():  # no Content-Length: counted as it comes
            for _ in range(5):
                yield b'\1' * (MIB // 4)
        self.assert_error(413, self.admin.put('/v1/images/big/file', content=chunks()),
                          'max_image_bytes')
        self.assertEqual([], self.warehouse.images())
        self.assertEqual([], self.leftovers())
        # Within it, and above max_body_bytes.
        self.assert_ok(201, self.upload(self.admin, 'fits', self.raw(MIB)))

    def test_a_member_uploads_nothing(self):
        self.assert_error(403, self.upload(self.member, 'cirros', self.raw()))
        self.assertEqual([], self.warehouse.images())


class OpenApiTest(ApiTestCase):

    def test_the_document_describes_the_bodies(self):
        document = self.assert_ok(200, self.admin.get('/v1/openapi.json'))
        paths = document['paths']
        for path, method in (('/v1/clouds', 'post'), ('/v1/applications', 'post'),
                             ('/v1/deployments', 'post'), ('/v1/clouds/{name}', 'patch')):
            self.assertIn('requestBody', paths[path][method], path)
        upload = paths['/v1/images/{name}/file']['put']
        self.assertIn('application/octet-stream', upload['requestBody']['content'])
        schemas = document['components']['schemas']
        for name in ('CloudList', 'DeploymentBody', 'ApplicationCreate', 'Live', 'History'):
            self.assertIn(name, schemas)
        self.assertIn('201', paths['/v1/clouds']['post']['responses'])
        self.assertIn('202', paths['/v1/deployments']['post']['responses'])
