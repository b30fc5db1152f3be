"""``vmcloud cloud|app|deployment ...`` through the REST API (VMCLOUD_API_URL and a user's
credentials), run as a user runs them, their JSON the API's own answer."""
import json
import os
import subprocess
import sys

import fixtures

from tests.functional.api import base
from tests.functional.api import helpers

VMCLOUD = os.path.join(os.path.dirname(sys.executable), 'vmcloud')


class CliOverApiTest(base.ApiStackTest, helpers.ApiChecks):

    def vmcloud(self, *args: str, password: str | None = None,
                user: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith('VMCLOUD_')}
        env.update(VMCLOUD_API_URL=str(self.as_admin.base_url).rstrip('/'),
                   VMCLOUD_USERNAME=user or self.ADMIN,
                   VMCLOUD_PASSWORD=self.ADMIN_PASSWORD if password is None else password)
        # No configuration file: the API is all the command needs.
        # Run elsewhere than the worktree: nothing found in the working directory counts.
        return subprocess.run([VMCLOUD, *args], capture_output=True, timeout=120, env=env,
                              cwd=self.useFixture(fixtures.TempDir()).path)

    def json_of(self, *args: str, **kwargs):
        result = self.vmcloud(*args, '-f', 'json', **kwargs)
        self.assertEqual(0, result.returncode, result.stderr)
        return json.loads(result.stdout)

    def api(self, path: str, key: str) -> dict:
        return self.assert_status(200, self.as_admin.get(path))[key]

    def test_cloud_create_list_show_update_delete(self):
        created = self.json_of('cloud', 'create', 'cli-cloud', '--connection-limit', '12',
                               '--host', 'node1')
        self.assertEqual(self.api('/v1/clouds/cli-cloud', 'cloud'), created)
        self.assertEqual((12, ['node1']), (created['connection_limit'], created['hosts']))
        self.assertEqual(self.api('/v1/clouds', 'clouds'), self.json_of('cloud', 'list'))
        self.assertEqual(self.api('/v1/clouds/cli-cloud', 'cloud'),
                         self.json_of('cloud', 'show', 'cli-cloud'))
        updated = self.json_of('cloud', 'update', 'cli-cloud', '--connection-limit', '30',
                               '--add-host', 'node2', '--remove-host', 'node1')
        self.assertEqual((30, ['node2']), (updated['connection_limit'], updated['hosts']))
        self.assertEqual(self.api('/v1/clouds/cli-cloud', 'cloud'), updated)
        table = self.vmcloud('cloud', 'list')
        self.assertEqual(0, table.returncode, table.stderr)
        self.assertIn(b'cli-cloud', table.stdout)
        self.assertEqual(0, self.vmcloud('cloud', 'delete', 'cli-cloud').returncode)
        self.assert_error(404, self.as_admin.get('/v1/clouds/cli-cloud'))
        missing = self.vmcloud('cloud', 'show', 'cli-cloud')
        self.assert_one_line_error(missing, b'cli-cloud')

    def test_app_create_list_show_delete(self):
        created = self.json_of('app', 'create', 'cli-app', '--image', self.IMAGE,
                               '--port', '8080', '--protocol', 'http',
                               '--connection-limit', '9')
        self.assertEqual(self.api('/v1/applications/cli-app', 'application'), created)
        self.assertEqual((8080, 'http', 9), (created['port'], created['protocol'],
                                             created['connection_limit']))
        self.assertEqual(self.api('/v1/applications', 'applications'),
                         self.json_of('app', 'list'))
        self.assertEqual(created, self.json_of('app', 'show', 'cli-app'))
        self.assertEqual(0, self.vmcloud('app', 'delete', 'cli-app').returncode)
        self.assert_error(404, self.as_admin.get('/v1/applications/cli-app'))

    def test_deployment_create_list_show_delete(self):
        self.assert_status(201, self.as_admin.post('/v1/applications', json={
            'name': 'cli-web', 'image': self.IMAGE, 'port': 80, 'protocol': 'http'}))
        self.addCleanup(self.as_admin.delete, '/v1/applications/cli-web')
        created = self.json_of('deployment', 'create', '--application', 'cli-web',
                               '--cloud', 'default', '--count', '2', '--wait')
        self.addCleanup(helpers.delete_deployment, self.as_admin, created['id'])
        self.assertEqual('active', created['state'])
        self.assertEqual(2, len(created['instances']))
        self.assertEqual(self.ADMIN, created['owner'])
        shown = self.json_of('deployment', 'show', created['id'])
        self.assertEqual(self.without_progress(self.api(f'/v1/deployments/{created["id"]}',
                                                        'deployment')),
                         self.without_progress(shown))
        listed = self.json_of('deployment', 'list')
        self.assertEqual([d['id'] for d in self.as_admin.get('/v1/deployments').json()[
            'deployments']], [d['id'] for d in listed])
        self.assertIn(created['id'], [d['id'] for d in listed])
        from_image = self.json_of('deployment', 'create', '--image', self.IMAGE,
                                  '--count', '1', '--wait')
        self.addCleanup(helpers.delete_deployment, self.as_admin, from_image['id'])
        self.assertEqual('active', from_image['state'])

        deleted = self.vmcloud('deployment', 'delete', created['id'])
        self.assertEqual(0, deleted.returncode, deleted.stderr)
        helpers.wait_deleted(self.as_admin, created['id'])

    @staticmethod
    def without_progress(deployment: dict) -> dict:
        """What both show: the API adds its progress block, a command may not."""
        return {k: v for k, v in deployment.items() if k != 'progress'}

    def test_a_member_deploys_but_creates_no_cloud_and_deletes_only_its_own(self):
        refused = self.vmcloud('cloud', 'create', 'by-member', '--connection-limit', '1',
                               user=self.MEMBER, password=self.MEMBER_PASSWORD)
        self.assert_one_line_error(refused, b'admin')
        self.assert_error(404, self.as_admin.get('/v1/clouds/by-member'))
        mine = self.json_of('deployment', 'create', self.IMAGE, '-n', '1', user=self.MEMBER,
                            password=self.MEMBER_PASSWORD)
        self.addCleanup(helpers.delete_deployment, self.as_admin, mine['id'])
        self.assertEqual(self.MEMBER, mine['owner'])
        # Not bob's to delete.
        refused = self.vmcloud('deployment', 'delete', mine['id'], user=self.BOB,
                               password=self.BOB_PASSWORD)
        self.assert_one_line_error(refused)
        self.assertNotEqual('deleted', self.api(f'/v1/deployments/{mine["id"]}',
                                                'deployment')['state'])

    def test_a_wrong_password_exits_non_zero_naming_the_problem(self):
        result = self.vmcloud('cloud', 'list', password='not-the-password')
        self.assertNotEqual(0, result.returncode)
        self.assertEqual(b'', result.stdout)
        self.assert_one_line_error(result, b'password')
