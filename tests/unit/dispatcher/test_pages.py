"""Pages of every list and the owners of deployments, through DispatcherAPI over fake://
(as the REST API asks: limit + 1 rows, then the next page after the last one shown)."""
import fixtures

from vmcloud import exception
from tests.unit.dispatcher import helpers


class PagesTest(helpers.CloudTestCase):
    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.FakeLogger())

    def every_page(self, listing, key: str, limit: int, **filters) -> list[list[str]]:
        """The keys of each page as the API reads them: ``limit`` + 1 rows to know
        whether a next page exists."""
        pages, marker = [], None
        while True:
            rows = listing(limit=limit + 1, marker=marker, **filters)
            pages.append([row[key] for row in rows[:limit]])
            if len(rows) <= limit:
                return pages
            if len(pages) > 100:
                self.fail(f'no end of pages: the last ones are {pages[-2:]}')
            marker = pages[-1][-1]

    def test_clouds_applications_and_hosts_page_by_name(self):
        for name in ('c3', 'c1', 'c2', 'c4'):
            self.api.create_cloud(name, 5)
            self.api.create_application(f'app-{name}', 'guest', 80, 'http')
        self.assertEqual([['c1', 'c2'], ['c3', 'c4'], ['default']],
                         self.every_page(self.api.list_clouds, 'name', 2))
        self.assertEqual([['app-c1', 'app-c2', 'app-c3'], ['app-c4']],
                         self.every_page(self.api.list_applications, 'name', 3))
        self.assertEqual([['node1'], ['node2']],
                         self.every_page(self.api.list_hosts, 'name', 1))
        # No page asked for: all of them, as before.
        self.assertEqual(['c1', 'c2', 'c3', 'c4', 'default'],
                         [c['name'] for c in self.api.list_clouds()])
        self.assertEqual(['node2'], [h['name'] for h in self.api.list_hosts(marker='node1')])
        for listing in (self.api.list_clouds, self.api.list_applications,
                        self.api.list_hosts, self.api.list_deployments,
                        self.api.list_snapshots):
            error = self.assertRaises(exception.MarkerNotFound, listing, limit=2,
                                      marker='nosuch')
            self.assertEqual('nosuch', error.marker)

    def test_deployments_page_newest_first_with_their_owner_and_cloud(self):
        self.api.create_cloud('blue', 5)
        self.api.create_application('web', 'guest', 80, 'http')
        made = [self.api.deploy('guest', 1, owner='alice'),
                self.api.deploy_application('web', 'blue', 1, owner='bob'),
                self.api.deploy('guest', 1),
                self.api.deploy_application('web', 'blue', 1, owner='alice'),
                self.api.deploy('guest', 1, cloud='blue', owner='alice')]
        self.assertEqual(['alice', 'bob', None, 'alice', 'alice'],
                         [d['owner'] for d in made])
        self.assertEqual('bob', self.api.show_deployment(made[1]['id'])['owner'])
        newest = [d['id'] for d in reversed(made)]
        self.assertEqual(newest, [d['id'] for d in self.api.list_deployments()])
        self.assertEqual([newest[:2], newest[2:4], newest[4:]],
                         self.every_page(self.api.list_deployments, 'id', 2))
        alice = [d['id'] for d in reversed(made) if d['owner'] == 'alice']
        self.assertEqual([alice[:2], alice[2:]],
                         self.every_page(self.api.list_deployments, 'id', 2, owner='alice'))
        self.assertEqual([made[4]['id'], made[3]['id']],
                         [d['id'] for d in self.api.list_deployments(cloud='blue',
                                                                     owner='alice')])
        self.assertEqual([], self.api.list_deployments(owner='carol'))

    def test_a_deployment_from_a_snapshot_has_its_owner_and_snapshots_page(self):
        deployment = self.deploy_and_wait(count=1)
        snapshots = []
        for _ in range(3):
            snapshots.append(self.api.wait_snapshot(
                self.api.snapshot(deployment['id'])['id'], helpers.TIMEOUT))
        newest = [s['id'] for s in reversed(snapshots)]
        self.assertEqual([newest[:2], newest[2:]],
                         self.every_page(self.api.list_snapshots, 'id', 2,
                                         deployment_id=deployment['id']))
        self.assertEqual(newest[1:], [s['id'] for s in self.api.list_snapshots(
            marker=newest[0])])
        restored = self.api.deploy_snapshot(newest[0], owner='alice')
        self.assertEqual('alice', restored['owner'])
        self.assertEqual([restored['id']],
                         [d['id'] for d in self.api.list_deployments(owner='alice')])
