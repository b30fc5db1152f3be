"""Every resource of /v1 created, listed, shown, changed and deleted over HTTP, against a
running stack: the API server on a real port, the real dispatcher and its SQLite
database, fake-driver compute hosts (base.ApiStackTest)."""
import datetime
import hashlib

import fixtures

from vmcloud.db import api as db_api
from tests.functional.api import base
from tests.functional.api import helpers
from tests.functional.storage import image_factory


class CloudsTest(base.ApiStackTest, helpers.ApiChecks):

    def test_create_list_show_update_assign_unassign_delete(self):
        created = self.as_admin.post('/v1/clouds', json={'name': 'alpha', 'connection_limit': 10,
                                                         'hosts': []})
        cloud = self.assert_status(201, created)['cloud']
        self.assertTrue(created.headers['Location'].endswith('/v1/clouds/alpha'),
                        created.headers)
        self.assertEqual(('alpha', 10, []), (cloud['name'], cloud['connection_limit'],
                                             cloud['hosts']))

        listed = self.assert_status(200, self.as_admin.get('/v1/clouds'))
        names = [c['name'] for c in listed['clouds']]
        self.assertIn('alpha', names)
        self.assertIn('default', names)
        self.assertEqual(sorted(names), names)
        self.assertEqual([], listed['clouds_links'])
        # A member reads them too.
        self.assertEqual(listed, self.assert_status(200, self.as_member.get('/v1/clouds')))

        shown = self.assert_status(200, self.as_admin.get('/v1/clouds/alpha'))['cloud']
        self.assertEqual(cloud['name'], shown['name'])
        self.assertEqual(10, shown['connection_limit'])

        updated = self.assert_status(200, self.as_admin.patch(
            '/v1/clouds/alpha', json={'connection_limit': 25}))['cloud']
        self.assertEqual(25, updated['connection_limit'])
        self.assertEqual(25, self.as_admin.get('/v1/clouds/alpha').json()['cloud']
                         ['connection_limit'])

        assigned = self.assert_status(200, self.as_admin.put('/v1/clouds/alpha/hosts/node1'))
        self.assertEqual(['node1'], assigned['cloud']['hosts'])
        self.assertEqual(['node1'], self.as_admin.get('/v1/clouds/alpha').json()['cloud']
                         ['hosts'])
        # Its last host would leave it placing on every host: refused, kept.
        self.assert_error(409, self.as_admin.delete('/v1/clouds/alpha/hosts/node1'),
                          'no host')
        self.assert_status(200, self.as_admin.put('/v1/clouds/alpha/hosts/node2'))
        self.assert_status(204, self.as_admin.delete('/v1/clouds/alpha/hosts/node1'))
        self.assertEqual(['node2'], self.as_admin.get('/v1/clouds/alpha').json()['cloud']
                         ['hosts'])

        deleted = self.as_admin.delete('/v1/clouds/alpha')
        self.assert_status(204, deleted)
        self.assertEqual(b'', deleted.content)
        self.assert_error(404, self.as_admin.get('/v1/clouds/alpha'), 'alpha')
        self.assertNotIn('alpha', [c['name'] for c in self.as_admin.get('/v1/clouds').json()
                                   ['clouds']])

    def test_create_with_hosts(self):
        cloud = self.assert_status(201, self.as_admin.post(
            '/v1/clouds', json={'name': 'pinned', 'connection_limit': 3,
                                'hosts': ['node2']}))['cloud']
        self.addCleanup(self.as_admin.delete, '/v1/clouds/pinned')
        self.assertEqual(['node2'], cloud['hosts'])

    def test_name_taken_is_409_and_changes_nothing(self):
        self.assert_status(201, self.as_admin.post(
            '/v1/clouds', json={'name': 'taken', 'connection_limit': 5}))
        self.addCleanup(self.as_admin.delete, '/v1/clouds/taken')
        self.assert_error(409, self.as_admin.post(
            '/v1/clouds', json={'name': 'taken', 'connection_limit': 99}), 'taken')
        self.assertEqual(5, self.as_admin.get('/v1/clouds/taken').json()['cloud']
                         ['connection_limit'])

    def test_delete_with_a_live_deployment_is_409(self):
        self.assert_status(201, self.as_admin.post(
            '/v1/clouds', json={'name': 'busy', 'connection_limit': 5}))
        self.addCleanup(self.as_admin.delete, '/v1/clouds/busy')
        deployment = self.assert_status(202, self.as_admin.post(
            '/v1/deployments', json={'image': self.IMAGE, 'count': 1, 'cloud': 'busy'}))[
                'deployment']
        self.addCleanup(helpers.delete_deployment, self.as_admin, deployment['id'])
        self.assert_error(409, self.as_admin.delete('/v1/clouds/busy'), 'busy')
        self.assert_status(200, self.as_admin.get('/v1/clouds/busy'))
        helpers.delete_deployment(self.as_admin, deployment['id'])
        # Once its deployment is deleted, it goes.
        self.assert_status(204, self.as_admin.delete('/v1/clouds/busy'))

    def test_the_default_cloud_cannot_be_deleted(self):
        self.assert_error(409, self.as_admin.delete('/v1/clouds/default'), 'default')
        self.assert_status(200, self.as_admin.get('/v1/clouds/default'))

    def test_unknown_cloud_or_host_is_404(self):
        self.assert_error(404, self.as_admin.get('/v1/clouds/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.patch('/v1/clouds/nosuch',
                                                   json={'connection_limit': 3}), 'nosuch')
        self.assert_error(404, self.as_admin.delete('/v1/clouds/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.put('/v1/clouds/nosuch/hosts/node1'), 'nosuch')
        self.assert_error(404, self.as_admin.put('/v1/clouds/default/hosts/nohost'), 'nohost')
        self.assert_error(404, self.as_admin.post(
            '/v1/clouds', json={'name': 'ghosts', 'connection_limit': 3,
                                'hosts': ['nohost']}), 'nohost')
        self.assert_error(404, self.as_admin.get('/v1/clouds/ghosts'))

    def test_bad_bodies_are_422_naming_the_field(self):
        cases = [
            ({'name': 'Bad_Name!', 'connection_limit': 3}, 'name'),
            ({'name': 'x' * 33, 'connection_limit': 3}, 'name'),
            ({'name': 'zero', 'connection_limit': 0}, 'connection_limit'),
            ({'name': 'minus', 'connection_limit': -1}, 'connection_limit'),
            ({'name': 'text', 'connection_limit': 'ten'}, 'connection_limit'),
            ({'name': 'nolimit'}, 'connection_limit'),
            ({'name': 'typo', 'connection_limit': 3, 'hostz': []}, 'hostz'),
            ({'name': 'hosts', 'connection_limit': 3, 'hosts': 'node1'}, 'hosts'),
        ]
        for body, field in cases:
            self.assert_error(422, self.as_admin.post('/v1/clouds', json=body), field)
        names = {c['name'] for c in self.as_admin.get('/v1/clouds').json()['clouds']}
        self.assertEqual(set(), names & {'zero', 'minus', 'text', 'nolimit', 'typo', 'hosts'})
        self.assert_error(422, self.as_admin.patch('/v1/clouds/default',
                                                   json={'connection_limit': 0}),
                          'connection_limit')
        self.assert_error(422, self.as_admin.patch('/v1/clouds/default',
                                                   json={'name': 'renamed'}), 'name')


class ApplicationsTest(base.ApiStackTest, helpers.ApiChecks):

    def create(self, name: str = 'web', **fields) -> dict:
        body = {'name': name, 'image': self.IMAGE, 'port': 8080, 'protocol': 'http', **fields}
        response = self.as_admin.post('/v1/applications', json=body)
        application = self.assert_status(201, response)['application']
        self.assertTrue(response.headers['Location'].endswith(f'/v1/applications/{name}'))
        return application

    def test_create_list_show_update_delete(self):
        application = self.create('web', vcpus=1, memory_mib=128, connection_limit=50)
        self.assertEqual(('web', 8080, 'http', 128, 50),
                         (application['name'], application['port'], application['protocol'],
                          application['memory_mib'], application['connection_limit']))
        listed = self.assert_status(200, self.as_member.get('/v1/applications'))
        self.assertEqual(['web'], [a['name'] for a in listed['applications']])
        self.assertEqual([], listed['applications_links'])
        shown = self.assert_status(200, self.as_member.get('/v1/applications/web'))
        self.assertEqual(8080, shown['application']['port'])

        updated = self.assert_status(200, self.as_admin.patch(
            '/v1/applications/web', json={'port': 9090, 'connection_limit': 7}))['application']
        self.assertEqual((9090, 7), (updated['port'], updated['connection_limit']))
        # null clears the limit: its cloud's only.
        cleared = self.assert_status(200, self.as_admin.patch(
            '/v1/applications/web', json={'connection_limit': None}))['application']
        self.assertIsNone(cleared['connection_limit'])
        self.assertEqual(9090, cleared['port'])
        shown = self.as_admin.get('/v1/applications/web').json()['application']
        self.assertEqual((9090, None), (shown['port'], shown['connection_limit']))

        self.assert_status(204, self.as_admin.delete('/v1/applications/web'))
        self.assert_error(404, self.as_admin.get('/v1/applications/web'), 'web')
        self.assertEqual([], self.as_admin.get('/v1/applications').json()['applications'])

    def test_errors(self):
        self.create('dup')
        self.addCleanup(self.as_admin.delete, '/v1/applications/dup')
        body = {'name': 'dup', 'image': self.IMAGE, 'port': 80, 'protocol': 'tcp'}
        self.assert_error(409, self.as_admin.post('/v1/applications', json=body), 'dup')
        self.assertEqual(8080, self.as_admin.get('/v1/applications/dup').json()[
            'application']['port'])
        self.assert_error(404, self.as_admin.get('/v1/applications/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.patch('/v1/applications/nosuch',
                                                   json={'port': 81}), 'nosuch')
        self.assert_error(404, self.as_admin.delete('/v1/applications/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.post('/v1/applications', json={
            'name': 'noimage', 'image': 'nosuchimage', 'port': 80, 'protocol': 'tcp'}),
            'nosuchimage')
        for bad, field in [({'port': 70000}, 'port'), ({'port': 0}, 'port'),
                           ({'protocol': 'ftp'}, 'protocol'), ({'vcpus': 0}, 'vcpus'),
                           ({'name': 'UPPER'}, 'name'), ({'colour': 'red'}, 'colour')]:
            body = {'name': 'bad', 'image': self.IMAGE, 'port': 80, 'protocol': 'tcp', **bad}
            self.assert_error(422, self.as_admin.post('/v1/applications', json=body), field)
        self.assert_error(422, self.as_admin.patch('/v1/applications/dup',
                                                   json={'port': 70000}), 'port')
        self.assert_error(422, self.as_admin.patch('/v1/applications/dup',
                                                   json={'name': 'renamed'}), 'name')
        self.assertEqual(['dup'], [a['name'] for a in self.as_admin.get(
            '/v1/applications').json()['applications']])

    def test_delete_while_deployed_is_409(self):
        self.create('live')
        self.addCleanup(self.as_admin.delete, '/v1/applications/live')
        deployment = self.assert_status(202, self.as_admin.post(
            '/v1/deployments', json={'application': 'live', 'count': 1}))['deployment']
        self.addCleanup(helpers.delete_deployment, self.as_admin, deployment['id'])
        self.assert_error(409, self.as_admin.delete('/v1/applications/live'), 'live')
        self.assert_status(200, self.as_admin.get('/v1/applications/live'))


class DeploymentsTest(base.ApiStackTest, helpers.ApiChecks):

    def deploy(self, client=None, **body) -> dict:
        response = (client or self.as_admin).post('/v1/deployments', json=body)
        deployment = self.assert_status(202, response)['deployment']
        self.addCleanup(helpers.delete_deployment, self.as_admin, deployment['id'])
        self.assertTrue(response.headers['Location'].endswith(
            f'/v1/deployments/{deployment["id"]}'), response.headers)
        return deployment

    def test_from_an_application_with_progress_then_delete(self):
        self.assert_status(201, self.as_admin.post('/v1/applications', json={
            'name': 'shop', 'image': self.IMAGE, 'port': 80, 'protocol': 'http'}))
        self.addCleanup(self.as_admin.delete, '/v1/applications/shop')
        deployment = self.deploy(application='shop', cloud='default', count=2)
        self.assertEqual(('shop', 'default', 2), (deployment['application'],
                                                  deployment['cloud'], deployment['count']))
        self.assertEqual(2, deployment['progress']['total'])
        self.assertLessEqual({'total', 'active', 'building', 'error', 'deleted'},
                             set(deployment['progress']))
        self.assertEqual(self.user_name(self.as_admin), deployment['owner'])

        active = helpers.wait_deployment(self.as_admin, deployment['id'])
        self.assertEqual({'total': 2, 'active': 2, 'building': 0, 'error': 0, 'deleted': 0},
                         {k: active['progress'][k] for k in ('total', 'active', 'building',
                                                             'error', 'deleted')})
        self.assertEqual(['active', 'active'], [i['state'] for i in active['instances']])
        self.assertIsNotNone(active['listener_port'])
        listed = self.as_member.get('/v1/deployments').json()
        self.assertIn(deployment['id'], [d['id'] for d in listed['deployments']])

        deleted = self.as_admin.delete(f'/v1/deployments/{deployment["id"]}')
        self.assertIn(self.assert_status(202, deleted)['deployment']['state'],
                      ('deleting', 'deleted'))
        gone = helpers.wait_deleted(self.as_admin, deployment['id'])
        self.assertEqual(2, gone['progress']['deleted'])
        self.assertIsNone(gone['listener_port'])

    def test_from_an_image_then_a_snapshot_then_deploy_the_snapshot(self):
        deployment = self.deploy(image=self.IMAGE, count=2, vcpus=1, memory_mib=128)
        helpers.wait_deployment(self.as_admin, deployment['id'])

        response = self.as_admin.post(f'/v1/deployments/{deployment["id"]}/snapshots')
        snapshot = self.assert_status(202, response)['snapshot']
        self.assertEqual(deployment['id'], snapshot['deployment_id'])
        snapshot = helpers.wait_for(self.as_admin, f'/v1/snapshots/{snapshot["id"]}',
                                    'snapshot', lambda s: s['state'] == 'available',
                                    'snapshot available')
        self.assertEqual(2, len(snapshot['items']))
        listed = self.assert_status(200, self.as_member.get(
            '/v1/snapshots', params={'deployment': deployment['id']}))
        self.assertEqual([snapshot['id']], [s['id'] for s in listed['snapshots']])
        self.assertIn(snapshot['id'], [s['id'] for s in self.as_admin.get(
            '/v1/snapshots').json()['snapshots']])
        self.assert_error(404, self.as_admin.get('/v1/snapshots',
                                                 params={'deployment': 'nosuch'}), 'nosuch')
        helpers.delete_deployment(self.as_admin, deployment['id'])

        again = self.deploy(snapshot=snapshot['id'])
        again = helpers.wait_deployment(self.as_admin, again['id'])
        self.assertEqual({item['version'] for item in snapshot['items']},
                         {i['image'] for i in again['instances']})
        self.assertEqual(2, again['progress']['active'])

    def test_errors(self):
        self.assert_error(404, self.as_admin.get('/v1/deployments/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.delete('/v1/deployments/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.post('/v1/deployments/nosuch/snapshots'),
                          'nosuch')
        self.assert_error(404, self.as_admin.get('/v1/snapshots/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.post('/v1/deployments', json={
            'snapshot': 'nosuch'}), 'nosuch')
        self.assert_error(404, self.as_admin.post('/v1/deployments', json={
            'application': 'nosuch', 'count': 1}), 'nosuch')
        self.assert_error(404, self.as_admin.post('/v1/deployments', json={
            'image': 'nosuchimage', 'count': 1}), 'nosuchimage')
        self.assert_error(404, self.as_admin.post('/v1/deployments', json={
            'image': self.IMAGE, 'count': 1, 'cloud': 'nosuch'}), 'nosuch')
        self.assert_error(409, self.as_admin.post('/v1/deployments', json={
            'image': self.IMAGE, 'count': 1000}), '1000')
        for body in [{'image': self.IMAGE, 'count': 0}, {'image': self.IMAGE, 'count': 1001},
                     {'image': self.IMAGE}, {},
                     {'image': self.IMAGE, 'application': 'x', 'count': 1},
                     {'image': self.IMAGE, 'count': 1, 'colour': 'red'},
                     {'snapshot': 'x', 'count': 1}]:
            self.assert_error(422, self.as_admin.post('/v1/deployments', json=body))
        self.assert_error(422, self.as_admin.post('/v1/deployments', json={
            'image': self.IMAGE, 'count': 2, 'min_count': 3}))
        self.assertEqual([], [d for d in self.as_admin.get('/v1/deployments').json()
                              ['deployments'] if d['state'] != 'deleted'])

    def test_owner_filter_and_cloud_filter(self):
        mine = self.deploy(client=self.as_member, image=self.IMAGE, count=1)
        bobs = self.deploy(client=self.as_bob, image=self.IMAGE, count=1)
        member = self.user_name(self.as_member)
        self.assertEqual(member, mine['owner'])
        owned = self.as_admin.get('/v1/deployments', params={'owner': member}).json()
        self.assertEqual([mine['id']], [d['id'] for d in owned['deployments']
                                        if d['state'] != 'deleted'])
        self.assertNotIn(bobs['id'], [d['id'] for d in owned['deployments']])
        # Newest first.
        ids = [d['id'] for d in self.as_admin.get('/v1/deployments').json()['deployments']]
        self.assertLess(ids.index(bobs['id']), ids.index(mine['id']))
        self.assertEqual([], self.as_admin.get('/v1/deployments',
                                               params={'cloud': 'nosuch'}).json()[
            'deployments'])

    def test_monitoring_events_and_metrics(self):
        self.assert_status(201, self.as_admin.post('/v1/applications', json={
            'name': 'watched', 'image': self.IMAGE, 'port': 80, 'protocol': 'http'}))
        self.addCleanup(self.as_admin.delete, '/v1/applications/watched')
        deployment = self.deploy(client=self.as_member, application='watched', count=2)
        helpers.wait_deployment(self.as_admin, deployment['id'])

        def default_cloud(body: dict) -> dict:
            return {c['name']: c for c in body['clouds']}['default']
        # Answers may be coalesced for [api] live_max_age: wait for one of after the build.
        live = helpers.wait_for(
            self.as_member, '/v1/monitoring', 'clouds',
            lambda clouds: {c['name']: c for c in clouds}['default']['instances_running'] >= 2,
            'the monitoring figures of the deployment')
        cloud = {c['name']: c for c in live}['default']
        self.assertEqual((1, 1, 2), (cloud['applications_deployed'],
                                     cloud['applications_running'],
                                     cloud['instances_running']))
        body = self.assert_status(200, self.as_member.get('/v1/monitoring'))
        # No gateway in this stack: the gateway's figures are unknown, and said so.
        self.assertTrue(body['gateway'].startswith('unavailable'), body['gateway'])
        self.assertEqual((None, None, None), (default_cloud(body)['connections'],
                                              default_cloud(body)['users'],
                                              default_cloud(body)['available']))
        self.assertGreaterEqual(body['instances'].get('active', 0), 2)
        self.assertEqual(2, default_cloud(body)['hosts_total'])

        events = self.assert_status(200, self.as_member.get(
            '/v1/monitoring/events', params={'limit': 5}))['events']
        self.assertTrue(events)
        self.assertLessEqual(len(events), 5)
        self.assertEqual(sorted((e['at'] for e in events), reverse=True),
                         [e['at'] for e in events])
        self.assertIn('samples', self.assert_status(200, self.as_member.get(
            '/v1/monitoring/history')))
        metrics = self.as_admin.get('/metrics')
        self.assert_status(200, metrics)
        self.assertTrue(metrics.headers['Content-Type'].startswith('text/plain'))
        self.assertIn('# TYPE ', metrics.text)
        self.assert_error(401, self.anonymous.get('/metrics'))


class ImagesAndHostsTest(base.ApiStackTest, helpers.ApiChecks):

    def test_images_list_show(self):
        listed = self.assert_status(200, self.as_member.get('/v1/images'))
        names = [i['name'] for i in listed['images']]
        self.assertIn(self.IMAGE, names)
        self.assertEqual(sorted(names), names)
        shown = self.assert_status(200, self.as_member.get(f'/v1/images/{self.IMAGE}'))
        self.assertEqual(self.IMAGE, shown['image']['name'])
        self.assertTrue(shown['image']['versions'])
        self.assert_error(404, self.as_member.get('/v1/images/nosuch'), 'nosuch')

    def test_upload_a_raw_image_which_deploys(self):
        response = self.as_admin.put('/v1/images/tiny/file', params={'format': 'raw'},
                                     content=helpers.RAW_IMAGE,
                                     headers={'Content-Type': 'application/octet-stream'})
        uploaded = self.assert_status(201, response)['image']
        self.assertTrue(response.headers['Location'].endswith('/v1/images/tiny'),
                        response.headers)
        self.assertEqual((1, len(helpers.RAW_IMAGE)), (uploaded['version'], uploaded['size']))
        shown = self.as_admin.get('/v1/images/tiny').json()['image']
        self.assertEqual('tiny', shown['name'])
        self.assertEqual([1], [v['version'] for v in shown['versions']])
        self.assertIn('tiny', [i['name'] for i in self.as_member.get('/v1/images').json()[
            'images']])
        # An upload makes a new image; one of a name taken is refused, changing nothing
        # (new versions are snapshots').
        self.assert_error(409, self.as_admin.put(
            '/v1/images/tiny/file', params={'format': 'raw'},
            content=helpers.RAW_IMAGE[::-1]), 'tiny')
        self.assertEqual([1], [v['version'] for v in self.as_admin.get(
            '/v1/images/tiny').json()['image']['versions']])
        # It deploys.
        deployment = self.assert_status(202, self.as_admin.post(
            '/v1/deployments', json={'image': 'tiny', 'count': 1}))['deployment']
        self.addCleanup(helpers.delete_deployment, self.as_admin, deployment['id'])
        helpers.wait_deployment(self.as_admin, deployment['id'])

    def test_hostile_and_corrupt_images_are_422_and_nothing_is_stored(self):
        factory = image_factory.ImageFactory(self.useFixture(fixtures.TempDir()).path)
        cases = {
            'backed': (factory.with_backing_file(), 'qcow2'),
            'jsonbacked': (factory.with_json_backing(), 'qcow2'),
            'datafile': (factory.with_data_file(), 'qcow2'),
            'truncated': (factory.truncated(), 'qcow2'),
            'disguised': (factory.qcow2_from_raw(), 'raw'),
        }
        for name, (path, fmt) in cases.items():
            with open(path, 'rb') as f:
                data = f.read()
            self.assert_error(422, self.as_admin.put(
                f'/v1/images/{name}/file', params={'format': fmt}, content=data))
            self.assert_error(404, self.as_admin.get(f'/v1/images/{name}'), name)
        self.assertEqual(set(), set(cases) & {i['name'] for i in self.as_admin.get(
            '/v1/images').json()['images']})
        self.assert_error(422, self.as_admin.put('/v1/images/fmt/file',
                                                 params={'format': 'vmdk'},
                                                 content=helpers.RAW_IMAGE), 'format')
        self.assert_error(422, self.as_admin.put('/v1/images/Bad%20Name/file',
                                                 params={'format': 'raw'},
                                                 content=helpers.RAW_IMAGE))

    def test_hosts_list_show(self):
        listed = self.assert_status(200, self.as_member.get('/v1/hosts'))
        self.assertEqual(['node1', 'node2'], [h['name'] for h in listed['hosts']])
        self.assertEqual([], listed['hosts_links'])
        shown = self.assert_status(200, self.as_member.get('/v1/hosts/node1'))['host']
        self.assertEqual('node1', shown['name'])
        self.assertTrue(shown['up'])
        self.assert_error(404, self.as_member.get('/v1/hosts/nosuch'), 'nosuch')
        self.assert_error(404, self.as_admin.post('/v1/hosts/nosuch/fence'), 'nosuch')


class UsersAndTokensTest(base.ApiStackTest, helpers.ApiChecks):

    def login(self, name: str, password: str) -> str:
        response = self.anonymous.post('/v1/auth/tokens',
                                       json={'username': name, 'password': password})
        token = self.assert_status(201, response)['token']
        self.assertEqual(token['id'], response.headers['X-Subject-Token'])
        return token['id']

    def test_users_create_list_show_update_delete(self):
        response = self.as_admin.post('/v1/users', json={
            'name': 'carol', 'password': 'carol-secret-1', 'role': 'member'})
        user = self.assert_status(201, response)['user']
        self.assertTrue(response.headers['Location'].endswith('/v1/users/carol'))
        self.assertEqual(('carol', 'member'), (user['name'], user['role']))
        self.assertNotIn('password', user)
        self.assertNotIn('password_hash', user)
        listed = self.assert_status(200, self.as_admin.get('/v1/users'))
        names = [u['name'] for u in listed['users']]
        self.assertIn('carol', names)
        self.assertEqual(sorted(names), names)
        self.assertEqual('member', self.as_admin.get('/v1/users/carol').json()['user']['role'])

        token = self.login('carol', 'carol-secret-1')
        carol = self.client_with(token)
        self.assert_error(403, carol.post('/v1/clouds', json={'name': 'carols',
                                                              'connection_limit': 1}))
        updated = self.assert_status(200, self.as_admin.patch(
            '/v1/users/carol', json={'role': 'admin', 'password': 'carol-secret-2'}))['user']
        self.assertEqual('admin', updated['role'])
        self.anonymous_login_fails('carol', 'carol-secret-1')
        carol = self.client_with(self.login('carol', 'carol-secret-2'))
        self.assert_status(201, carol.post('/v1/clouds', json={'name': 'carols',
                                                               'connection_limit': 1}))
        self.assert_status(204, carol.delete('/v1/clouds/carols'))

        self.assert_status(204, self.as_admin.delete('/v1/users/carol'))
        self.assert_error(404, self.as_admin.get('/v1/users/carol'), 'carol')
        # Its tokens went with it.
        self.assert_error(401, carol.get('/v1/clouds'))
        self.anonymous_login_fails('carol', 'carol-secret-2')

    def anonymous_login_fails(self, name: str, password: str) -> None:
        response = self.anonymous.post('/v1/auth/tokens',
                                       json={'username': name, 'password': password})
        self.assert_error(401, response)
        self.assertNotIn('X-Subject-Token', response.headers)

    def test_user_errors(self):
        self.assert_status(201, self.as_admin.post('/v1/users', json={
            'name': 'dave', 'password': 'dave-secret-1', 'role': 'member'}))
        self.addCleanup(self.as_admin.delete, '/v1/users/dave')
        self.assert_error(409, self.as_admin.post('/v1/users', json={
            'name': 'dave', 'password': 'other-secret', 'role': 'admin'}), 'dave')
        self.assertEqual('member', self.as_admin.get('/v1/users/dave').json()['user']['role'])
        for body, field in [({'name': 'eve', 'password': 'short', 'role': 'member'},
                             'password'),
                            ({'name': 'eve', 'password': 'long-enough', 'role': 'root'},
                             'role'),
                            ({'name': 'eve', 'password': 'long-enough'}, 'role'),
                            ({'name': 'eve', 'password': 'long-enough', 'role': 'member',
                              'shell': '/bin/sh'}, 'shell')]:
            self.assert_error(422, self.as_admin.post('/v1/users', json=body), field)
        self.assert_error(404, self.as_admin.get('/v1/users/eve'))
        self.assert_error(404, self.as_admin.patch('/v1/users/nosuch', json={'role': 'admin'}))
        self.assert_error(404, self.as_admin.delete('/v1/users/nosuch'))
        self.assert_error(422, self.as_admin.patch('/v1/users/dave', json={'role': 'root'}),
                          'role')

    def test_token_create_show_revoke(self):
        token = self.login(self.MEMBER, self.MEMBER_PASSWORD)
        client = self.client_with(token)
        shown = self.assert_status(200, client.get('/v1/auth/tokens'))['token']
        self.assertNotIn('id', shown)
        self.assertEqual({'name': self.MEMBER, 'role': 'member'}, shown['user'])
        self.assertIn('expires_at', shown)
        # Bearer works as well as X-Auth-Token.
        bearer = self.client_with(None, headers={'Authorization': f'Bearer {token}'})
        self.assert_status(200, bearer.get('/v1/clouds'))

        self.assert_status(204, client.delete('/v1/auth/tokens'))
        self.assert_error(401, client.get('/v1/clouds'))
        self.assert_error(401, client.get('/v1/auth/tokens'))
        self.assert_error(401, bearer.get('/v1/clouds'))
        # The other tokens of the user still work.
        self.assert_status(200, self.as_member.get('/v1/clouds'))

    def test_an_expired_token_is_401(self):
        """Time moves by setting the token's expires_at in the database (vmcloud.db.api)."""
        token = self.login(self.MEMBER, self.MEMBER_PASSWORD)
        client = self.client_with(token)
        self.assert_status(200, client.get('/v1/clouds'))
        database = db_api.Database(self.conf)
        self.addCleanup(database.dispose)
        with database.session() as session:
            row = db_api.api_token_get(session, hashlib.sha256(token.encode()).hexdigest())
            self.assertIsNotNone(row, 'tokens are stored as their sha256 in hex')
            row.expires_at = (datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
                              - datetime.timedelta(seconds=1))
        response = client.get('/v1/clouds')
        self.assert_error(401, response)
        self.assertEqual('Token', response.headers['WWW-Authenticate'])

    def test_bad_logins_are_401(self):
        for body in [{'username': self.MEMBER, 'password': 'wrong-password'},
                     {'username': 'nobody', 'password': 'whatever-password'}]:
            self.assert_error(401, self.anonymous.post('/v1/auth/tokens', json=body))
        self.assert_error(422, self.anonymous.post('/v1/auth/tokens',
                                                   json={'username': self.MEMBER}))
        self.assert_error(401, self.client_with('not-a-token').get('/v1/clouds'))
