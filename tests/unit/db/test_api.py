"""Pages of the lists the API shows, and the API's users and tokens: vmcloud.db.api on
SQLite, and the same on PostgreSQL."""
import datetime
import random
import uuid

from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.db import models
from tests import base
from tests.unit.dispatcher import helpers

ROWS = 1000
T0 = datetime.datetime(2026, 6, 1)


def deployment(deployment_id: str, created_at: datetime.datetime, cloud: str = 'default',
               owner: str | None = None, **fields) -> models.Deployment:
    return models.Deployment(id=deployment_id, image='guest:1', count=1, min_count=1, vcpus=1,
                             memory_mib=256, state='active', cloud=cloud, owner=owner,
                             created_at=created_at, **fields)


class PagesTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.configure_database()
        self.db = db_api.Database(self.conf)
        self.db.upgrade()
        self.addCleanup(self.db.dispose)

    def configure_database(self) -> None:
        """SQLite under the test's state_path (the default connection)."""

    def add(self, rows: list[models.Base]) -> None:
        with self.db.session() as session:
            session.add_all(rows)

    def pages(self, listing, key: str, limit: int, between=None) -> list[list[str]]:
        """Every page of ``listing(session, limit, marker)``, as the keys of its rows;
        ``between(page number)`` runs between two pages."""
        pages, marker = [], None
        while True:
            with self.db.session() as session:
                page = [getattr(row, key) for row in listing(session, limit, marker)]
            if not page:
                return pages
            pages.append(page)
            if len(pages) > ROWS:
                self.fail(f'no end of pages: the last ones are {pages[-2:]}')
            marker = page[-1]
            if between is not None:
                between(len(pages))

    def assert_every_row_once_in_order(self, expected: list[str], pages: list[list[str]],
                                       limit: int) -> None:
        seen = [key for page in pages for key in page]
        self.assertEqual(len(seen), len(set(seen)), 'a row is on two pages')
        self.assertEqual(expected, seen)
        self.assertEqual([limit] * (len(pages) - 1), [len(p) for p in pages[:-1]])

    # -- by name -------------------------------------------------------------------

    def test_pages_by_name_hold_every_row_once_in_order(self):
        names = [f'n{index:04d}-{uuid.uuid4().hex[:6]}' for index in range(ROWS)]
        shuffled = random.sample(names, len(names))  # made in no particular order
        self.add([models.Cloud(name=n, connection_limit=1) for n in shuffled]
                 + [models.Application(name=n, image='guest', vcpus=1, memory_mib=1, port=80,
                                       protocol='http') for n in shuffled]
                 + [models.Host(name=n, up=True, vcpus=1, memory_mib=1, disk_bytes_free=1)
                    for n in shuffled]
                 + [models.ApiUser(name=n, password_hash='h', role='member')
                    for n in shuffled])
        for listing, extra in ((db_api.clouds, ['default']), (db_api.applications, []),
                               (db_api.hosts, []), (db_api.api_users, [])):
            expected = sorted(names + extra)
            self.assert_every_row_once_in_order(
                expected, self.pages(listing, 'name', 37), 37)
            with self.db.session() as session:  # no limit: all of them after the marker
                self.assertEqual(expected[501:], [r.name for r in listing(
                    session, marker=expected[500])])
                self.assertEqual(expected, [r.name for r in listing(session)])

    def test_an_unknown_marker_is_refused_naming_it(self):
        self.add([models.Host(name='node1', up=True, vcpus=1, memory_mib=1, disk_bytes_free=1),
                  deployment('d1', T0)])
        for listing in (db_api.clouds, db_api.applications, db_api.hosts, db_api.api_users,
                        db_api.deployments, db_api.snapshots):
            with self.db.session() as session:
                # 'node0' sorts before every host: it must still name one.
                error = self.assertRaises(exception.MarkerNotFound, listing, session,
                                          limit=10, marker='node0')
            self.assertEqual('node0', error.marker)
            self.assertIsInstance(error, exception.InvalidRequest)
            self.assertEqual('marker node0 not found', str(error))

    # -- newest first --------------------------------------------------------------

    def test_pages_newest_first_hold_every_row_once_even_as_rows_are_added(self):
        # Seven at a time made in one instant: the id orders them.
        rows = [deployment(str(uuid.uuid4()), T0 + datetime.timedelta(seconds=i // 7))
                for i in range(ROWS)]
        self.add(random.sample(rows, len(rows)))
        expected = [d.id for d in sorted(rows, key=lambda d: (d.created_at, d.id),
                                         reverse=True)]
        made = []

        def deploy_meanwhile(page: int) -> None:  # newer: on no page still to come
            made.append(str(uuid.uuid4()))
            self.add([deployment(made[-1], T0 + datetime.timedelta(days=1))])
        self.assert_every_row_once_in_order(
            expected, self.pages(db_api.deployments, 'id', 41, deploy_meanwhile), 41)
        self.assertEqual(len(expected) // 41 + 1, len(made))

        snapshots = [models.Snapshot(id=str(uuid.uuid4()), deployment_id=d.id,
                                     state='available', created_at=d.created_at) for d in rows]
        self.add(list(snapshots))
        self.assert_every_row_once_in_order(
            [s.id for s in sorted(snapshots, key=lambda s: (s.created_at, s.id),
                                  reverse=True)],
            self.pages(lambda session, limit, marker: db_api.snapshots(session, None, limit,
                                                                       marker), 'id', 100),
            100)

    def test_snapshots_of_one_deployment_page_among_themselves(self):
        self.add([deployment('d1', T0), deployment('d2', T0)])
        self.add([models.Snapshot(id=f's{i:02d}', deployment_id=f'd{1 + i % 2}',
                                  state='available', created_at=T0) for i in range(20)])
        with self.db.session() as session:
            first = [s.id for s in db_api.snapshots(session, 'd1', limit=4)]
            rest = [s.id for s in db_api.snapshots(session, 'd1', marker=first[-1])]
        self.assertEqual(['s18', 's16', 's14', 's12'], first)
        self.assertEqual(['s10', 's08', 's06', 's04', 's02', 's00'], rest)

    def test_deployments_of_a_cloud_and_an_owner_page_among_themselves(self):
        rows = [deployment(f'd{i:03d}', T0 + datetime.timedelta(seconds=i),
                           cloud=('blue', 'default')[i % 2],
                           owner=('alice', 'bob', None)[i % 3]) for i in range(60)]
        self.add(rows)

        def ids(**filters) -> list[str]:
            with self.db.session() as session:
                return [d.id for d in db_api.deployments(session, **filters)]
        newest = [d.id for d in reversed(rows)]
        self.assertEqual(newest, ids())
        self.assertEqual([d.id for d in reversed(rows) if d.cloud == 'blue'],
                         ids(cloud='blue'))
        alice_blue = [d.id for d in reversed(rows) if (d.cloud, d.owner) == ('blue', 'alice')]
        self.assertEqual(10, len(alice_blue))
        self.assertEqual(alice_blue[:3], ids(cloud='blue', owner='alice', limit=3))
        self.assertEqual(alice_blue[3:], ids(cloud='blue', owner='alice',
                                             marker=alice_blue[2]))
        self.assertEqual([], ids(owner='carol'))

    # -- users and tokens ------------------------------------------------------------

    def test_users_and_their_tokens(self):
        with self.db.session() as session:
            db_api.api_user_create(session, 'alice', 'hash-a', 'admin')
            db_api.api_user_create(session, 'bob', 'hash-b', 'member')
            for number, user, expires in ((1, 'alice', T0), (2, 'alice', T0.replace(year=2030)),
                                          (3, 'bob', T0), (4, 'bob', T0.replace(year=2030))):
                db_api.api_token_create(session, f'{number:064x}', user, expires)
        self.assertRaises(db_api.Conflict, self._create_user, 'alice')
        with self.db.session() as session:
            self.assertEqual(('hash-a', 'admin'),
                             (db_api.api_user_get(session, 'alice').password_hash,
                              db_api.api_user_get(session, 'alice').role))
            self.assertIsNone(db_api.api_user_get(session, 'carol'))
            self.assertEqual(2, db_api.api_tokens_delete_expired(session, T0.replace(day=2)))
        with self.db.session() as session:
            self.assertIsNone(db_api.api_token_get(session, f'{1:064x}'))
            self.assertEqual('alice', db_api.api_token_get(session, f'{2:064x}').user)
            db_api.api_token_delete(session, db_api.api_token_get(session, f'{2:064x}'))
            db_api.api_user_delete(session, db_api.api_user_get(session, 'bob'))
        with self.db.session() as session:
            self.assertEqual(['alice'], [u.name for u in db_api.api_users(session)])
            self.assertEqual(0, session.query(models.ApiToken).count())  # bob's went too
            self.assertEqual(0, db_api.api_tokens_delete_expired(session, T0.replace(day=2)))

    def test_the_tokens_of_one_user_are_deleted(self):
        with self.db.session() as session:
            for name in ('alice', 'bob'):
                db_api.api_user_create(session, name, 'hash', 'member')
            for number, user, expires in ((1, 'alice', T0), (2, 'alice', T0.replace(year=2030)),
                                          (3, 'bob', T0.replace(year=2030))):
                db_api.api_token_create(session, f'{number:064x}', user, expires)
        with self.db.session() as session:
            # Expired or not: every one of alice's.
            self.assertEqual(2, db_api.api_tokens_delete_of(
                session, db_api.api_user_get(session, 'alice')))
        with self.db.session() as session:
            self.assertEqual(['bob'], [t.user for t in session.query(models.ApiToken)])
            self.assertEqual(0, db_api.api_tokens_delete_of(
                session, db_api.api_user_get(session, 'alice')))
            self.assertIsNotNone(db_api.api_user_get(session, 'alice'))

    def _create_user(self, name: str) -> None:
        with self.db.session() as session:
            db_api.api_user_create(session, name, 'hash', 'member')


class PagesPostgresTest(PagesTest):
    def configure_database(self) -> None:
        helpers.use_postgres(self, 'vmcloud_pages')
