"""Pages of 1,000 rows and more, walked by their next links to the end.

The rows are inserted with vmcloud.db.api in one session of the dispatcher's database:
through the API a cloud took about 0.1 s here (an HTTP request, an RPC call and a commit
of its own), so 1,000 clouds would take well over a minute and a half, and 1,000
deployments, each a build, longer still; the subject here is the listing, not the
creating. The deployments are plain rows without
instances, deleted or active, so the scheduler and capacity never see them; some share a
created_at, so that the order's second key (id, descending) is walked too.
"""
import datetime
import urllib.parse
import uuid

from vmcloud.db import api as db_api
from tests.functional.api import base
from tests.functional.api import helpers

ROWS = 1000


def query_of(href: str) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(urllib.parse.urlsplit(href).query)


class KeysetPages(helpers.ApiChecks):
    """Pages over 1,000 clouds and deployments and 50 snapshots, in whichever database
    the class's stack has."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.clouds = [f'page-{i:04d}' for i in range(ROWS)]
        base_time = datetime.datetime(2030, 1, 1)
        rows = []
        for i in range(ROWS):
            # Three at a time share a second: the order of those is by id.
            rows.append((base_time + datetime.timedelta(seconds=i // 3), str(uuid.uuid4())))
        others = [(base_time + datetime.timedelta(seconds=i, milliseconds=500),
                   str(uuid.uuid4())) for i in range(50)]
        database = db_api.Database(cls.conf)
        try:
            with database.session() as session:
                for name in reversed(cls.clouds):  # not in the order they are listed in
                    db_api.cloud_create(session, name=name, connection_limit=5)
                for n, (created_at, deployment_id) in enumerate(rows + others):
                    db_api.deployment_create(
                        session, id=deployment_id, image=f'{cls.IMAGE}:1', count=1,
                        min_count=1, vcpus=1, memory_mib=64,
                        state='deleted' if n % 2 else 'active',
                        cloud='page-0001' if n < ROWS else 'default',
                        owner='pager' if n < ROWS else None, created_at=created_at)
                # Snapshots of one of them, and of another (the filter keeps to one).
                cls.snapshots = []
                for i in range(25):
                    snapshot_id = str(uuid.uuid4())
                    db_api.snapshot_create(session, id=snapshot_id, deployment_id=rows[0][1],
                                           state='available',
                                           created_at=base_time + datetime.timedelta(
                                               seconds=i // 2))
                    cls.snapshots.append((base_time + datetime.timedelta(seconds=i // 2),
                                          snapshot_id))
                    db_api.snapshot_create(session, id=str(uuid.uuid4()),
                                           deployment_id=rows[1][1], state='available',
                                           created_at=base_time)
        finally:
            database.dispose()
        cls.deployments = [d for _, d in sorted(rows, reverse=True)]
        cls.deployment_of_snapshots = rows[0][1]
        cls.snapshot_ids = [s for _, s in sorted(cls.snapshots, reverse=True)]

    def assert_walk(self, path: str, collection: str, key: str, expected: list[str],
                    limit: int, kept: dict[str, str]) -> None:
        """Every page from ``path`` on holds ``limit`` items but the last, whose next link
        there is none; each next link keeps the ``kept`` query parameters and says the
        marker of its page's last item; the items are ``expected`` exactly."""
        items, hrefs = helpers.walk(self.as_admin, path, collection)
        self.assertEqual(expected, [item[key] for item in items])
        pages = -(-len(expected) // limit)
        self.assertEqual(pages, len(hrefs), hrefs[:3])
        for number, href in enumerate(hrefs[1:], 1):
            query = query_of(href)
            for name, value in kept.items():
                self.assertEqual([value], query.get(name), href)
            self.assertEqual([expected[number * limit - 1]], query['marker'], href)
            self.assertEqual(urllib.parse.urlsplit(path).path,
                             urllib.parse.urlsplit(href).path, href)

    def test_deployments_pages_keep_their_filters(self):
        self.assert_walk('/v1/deployments?cloud=page-0001&limit=7', 'deployments', 'id',
                         self.deployments, 7, {'cloud': 'page-0001', 'limit': '7'})
        # A page size that divides the count: the last page is full and has no next link.
        self.assert_walk('/v1/deployments?limit=40&owner=pager', 'deployments', 'id',
                         self.deployments, 40, {'owner': 'pager', 'limit': '40'})
        self.assert_walk('/v1/deployments?cloud=page-0001', 'deployments', 'id',
                         self.deployments, self.conf.api.page_size, {'cloud': 'page-0001'})
        # Unfiltered: the other cloud's, made in between, come in their place.
        everything, _ = helpers.walk(self.as_admin, '/v1/deployments?limit=50', 'deployments')
        self.assertEqual(ROWS + 50, len({d['id'] for d in everything}))
        self.assertEqual(ROWS + 50, len(everything))
        created = [d['created_at'] for d in everything]
        self.assertEqual(sorted(created, reverse=True), created)

    def test_snapshots_pages_keep_the_deployment_filter(self):
        self.assert_walk(f'/v1/snapshots?deployment={self.deployment_of_snapshots}&limit=3',
                         'snapshots', 'id', self.snapshot_ids, 3,
                         {'deployment': self.deployment_of_snapshots, 'limit': '3'})

    def test_limits_and_markers(self):
        largest = self.conf.api.max_page_size
        page = self.assert_status(200, self.as_admin.get('/v1/clouds',
                                                         params={'limit': largest}))
        self.assertEqual(min(largest, ROWS + 1), len(page['clouds']))
        for collection in ('clouds', 'deployments', 'applications', 'hosts', 'snapshots',
                           'images', 'users'):
            self.assert_error(422, self.as_admin.get(f'/v1/{collection}',
                                                     params={'limit': largest + 1}), 'limit')
            self.assert_error(422, self.as_admin.get(f'/v1/{collection}',
                                                     params={'limit': 0}), 'limit')
            self.assert_error(400, self.as_admin.get(f'/v1/{collection}',
                                                     params={'marker': 'nosuch'}), 'nosuch')
        # A marker is the key of an item; the page after the last item is empty.
        last = self.as_admin.get('/v1/clouds', params={'marker': 'page-0999'}).json()
        self.assertEqual({'clouds': [], 'clouds_links': []}, last)
        after = self.as_admin.get('/v1/clouds', params={'marker': 'page-0997', 'limit': 2})
        self.assertEqual(['page-0998', 'page-0999'],
                         [c['name'] for c in after.json()['clouds']])
        self.assertEqual([], after.json()['clouds_links'])


class PaginationTest(KeysetPages, base.ApiStackTest):

    def test_clouds_pages_of_7_and_of_the_default(self):
        expected = sorted(self.clouds + ['default'])
        self.assert_walk('/v1/clouds?limit=7', 'clouds', 'name', expected, 7, {'limit': '7'})
        self.assert_walk('/v1/clouds', 'clouds', 'name', expected,
                         self.conf.api.page_size, {})

    def test_short_collections_page_too(self):
        for name in ('web-b', 'web-a', 'web-c'):
            self.assert_status(201, self.as_admin.post('/v1/applications', json={
                'name': name, 'image': self.IMAGE, 'port': 80, 'protocol': 'tcp'}))
            self.addCleanup(self.as_admin.delete, f'/v1/applications/{name}')
        self.assert_walk('/v1/applications?limit=2', 'applications', 'name',
                         ['web-a', 'web-b', 'web-c'], 2, {'limit': '2'})
        self.assert_walk('/v1/hosts?limit=1', 'hosts', 'name', ['node1', 'node2'], 1,
                         {'limit': '1'})
        users = sorted(u['name'] for u in self.as_admin.get('/v1/users').json()['users'])
        self.assert_walk('/v1/users?limit=1', 'users', 'name', users, 1, {'limit': '1'})
        images = sorted(i['name'] for i in self.as_admin.get('/v1/images').json()['images'])
        self.assert_walk('/v1/images?limit=1', 'images', 'name', images, 1, {'limit': '1'})


class PostgresPaginationTest(KeysetPages, base.ApiStackTest):
    """The same keyset pages in PostgreSQL, which orders and compares timestamps and ids
    itself (the API's other deployment of the dispatcher's database)."""

    DATABASE = 'postgresql'
