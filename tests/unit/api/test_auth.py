"""Users, passwords, tokens and the login throttle (auth.Identity over a real SQLite
database), and the routes over them: /v1/auth/tokens and /v1/users."""
import collections
import datetime
import hashlib
import threading

import argon2
import fixtures

from tests import base
from tests.unit.api import test_app
from vmcloud import exception
from vmcloud.api import auth
from vmcloud.db import api as db_api
from vmcloud.db import models

ADMIN, ADMIN_PASSWORD = test_app.ADMIN, test_app.ADMIN_PASSWORD
MEMBER, MEMBER_PASSWORD = test_app.MEMBER, test_app.MEMBER_PASSWORD


class CountingHasher(argon2.PasswordHasher):
    """The tests' cheap hasher, keeping the hash each verify was given."""

    def __init__(self):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified: list[str] = []

    def verify(self, password_hash, password) -> bool:
        self.verified.append(password_hash)
        return super().verify(password_hash, password)


class Clock:
    """Both clocks an Identity reads, moved by the test."""

    def __init__(self):
        self.wall = datetime.datetime(2024, 5, 1, 12, 0, 0)
        self.seconds = 1000.0

    def now(self) -> datetime.datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.seconds

    def advance(self, seconds: float) -> None:
        self.wall += datetime.timedelta(seconds=seconds)
        self.seconds += seconds


class IdentityTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.conf.set_override('connection', f'sqlite:///{self.tmp}/vmcloud.sqlite',
                               'database')
        self.conf.set_override('token_ttl', 600, 'api')
        self.database = db_api.Database(self.conf)
        self.database.upgrade()
        self.addCleanup(self.database.dispose)
        self.clock = Clock()
        self.identity = self.make_identity()
        self.identity.create_user(ADMIN, ADMIN_PASSWORD, 'admin')

    def make_identity(self, hasher=test_app.FAST_HASHER) -> auth.Identity:
        return auth.Identity(self.conf, self.database, now=self.clock.now,
                             monotonic=self.clock.monotonic, hasher=hasher)

    def stored(self, name: str):
        with self.database.session() as session:
            return db_api.api_user_get(session, name)

    def token_row(self, token: str):
        with self.database.session() as session:
            return db_api.api_token_get(session, hashlib.sha256(token.encode()).hexdigest())

    # -- users

    def test_create_show_list_update_delete(self):
        created = self.identity.create_user('carol', 'carol-secret', 'member')
        self.assertEqual({'name': 'carol', 'role': 'member'},
                         {k: created[k] for k in ('name', 'role')})
        self.assertEqual(created, self.identity.show_user('carol'))
        self.assertEqual([ADMIN, 'carol'], [u['name'] for u in self.identity.list_users()])
        self.assertEqual(['carol'], [u['name'] for u in self.identity.list_users(
            limit=5, marker=ADMIN)])
        self.assertRaises(exception.MarkerNotFound, self.identity.list_users, marker='nosuch')
        self.assertEqual('admin', self.identity.update_user('carol', role='admin')['role'])
        self.identity.update_user('carol', password='carol-secret-2')
        self.assertRaises(exception.Unauthorized, self.identity.login, 'carol',
                          'carol-secret', 'here')
        self.identity.login('carol', 'carol-secret-2', 'here')
        self.identity.delete_user('carol')
        for call in (self.identity.show_user, self.identity.delete_user,
                     lambda name: self.identity.update_user(name, role='member')):
            error = self.assertRaises(exception.UserNotFound, call, 'carol')
            self.assertEqual('user carol not found', str(error))

    def test_passwords_are_argon2_hashes(self):
        self.identity.create_user('carol', 'carol-secret', 'member')
        stored = self.stored('carol').password_hash
        self.assertTrue(stored.startswith('$argon2id$'), stored)
        self.assertNotIn('carol-secret', stored)
        self.assertNotIn('password', self.identity.show_user('carol'))
        self.assertNotIn('password_hash', self.identity.show_user('carol'))

    def test_bad_users_are_refused_and_nothing_is_stored(self):
        for name, password, role, fragment in (
                ('Carol', 'carol-secret', 'member', 'user name'),
                ('', 'carol-secret', 'member', 'user name'),
                ('c' * 65, 'carol-secret', 'member', 'user name'),
                ('carol', 'short', 'member', 'password'),
                ('carol', 'x' * (auth.MAX_PASSWORD + 1), 'member', 'password'),
                ('carol', 'carol-secret', 'root', 'role')):
            error = self.assertRaises(exception.InvalidRequest, self.identity.create_user,
                                      name, password, role)
            self.assertIn(fragment, str(error))
        self.assertEqual([ADMIN], [u['name'] for u in self.identity.list_users()])
        error = self.assertRaises(exception.NameInUse, self.identity.create_user, ADMIN,
                                  'other-secret', 'member')
        self.assertIn(ADMIN, str(error))
        self.assertEqual('admin', self.identity.show_user(ADMIN)['role'])
        self.assertRaises(exception.InvalidRequest, self.identity.update_user, ADMIN,
                          role='root')
        self.assertRaises(exception.InvalidRequest, self.identity.update_user, ADMIN,
                          password='short')

    # -- tokens

    def test_login_validate_show_revoke(self):
        token = self.identity.login(ADMIN, ADMIN_PASSWORD, 'here')
        self.assertEqual({'name': ADMIN, 'role': 'admin'}, token['user'])
        self.assertEqual((self.clock.wall + datetime.timedelta(seconds=600)).isoformat(),
                         token['expires_at'])
        # 32 random bytes, stored as their sha256 alone.
        self.assertGreaterEqual(len(token['id']), 43)
        row = self.token_row(token['id'])
        self.assertEqual(ADMIN, row.user)
        self.assertNotEqual(token['id'], row.id)
        user = self.identity.validate(token['id'])
        self.assertEqual(auth.User(ADMIN, 'admin'), user)
        self.assertTrue(user.is_admin)
        self.assertEqual({'expires_at': token['expires_at'], 'user': token['user']},
                         self.identity.show_token(token['id']))
        other = self.identity.login(ADMIN, ADMIN_PASSWORD, 'here')['id']
        self.identity.revoke(token['id'])
        self.assertRaises(exception.Unauthorized, self.identity.validate, token['id'])
        self.assertRaises(exception.Unauthorized, self.identity.show_token, token['id'])
        self.identity.revoke(token['id'])  # nothing to revoke: nothing happens
        self.assertEqual(ADMIN, self.identity.validate(other).name)
        for bogus in ('', 'nosuch', other[:-1]):
            self.assertRaises(exception.Unauthorized, self.identity.validate, bogus)

    def test_a_token_expires_after_the_ttl(self):
        token = self.identity.login(ADMIN, ADMIN_PASSWORD, 'here')['id']
        self.clock.advance(599)
        self.identity.validate(token)
        self.clock.advance(1)
        error = self.assertRaises(exception.Unauthorized, self.identity.validate, token)
        self.assertIn('expired', str(error))

    def test_a_token_issued_without_a_password(self):
        self.identity.create_user('scraper', 'scraper-secret', 'member')
        token = self.identity.issue_token('scraper')  # [api] token_ttl
        self.assertEqual({'name': 'scraper', 'role': 'member'}, token['user'])
        self.assertEqual((self.clock.wall + datetime.timedelta(seconds=600)).isoformat(),
                         token['expires_at'])
        self.assertEqual({'expires_at': token['expires_at'], 'user': token['user']},
                         self.identity.show_token(token['id']))
        year = self.identity.issue_token('scraper', ttl=auth.MAX_TOKEN_TTL)['id']
        self.clock.advance(auth.MAX_TOKEN_TTL - 1)
        self.assertEqual('scraper', self.identity.validate(year).name)
        self.assertRaises(exception.Unauthorized, self.identity.validate, token['id'])
        self.clock.advance(1)
        self.assertRaises(exception.Unauthorized, self.identity.validate, year)

    def test_an_issued_token_needs_a_user_and_a_lifetime_in_range(self):
        self.assertRaises(exception.UserNotFound, self.identity.issue_token, 'nobody')
        for ttl in (0, -1, auth.MIN_TOKEN_TTL - 1, auth.MAX_TOKEN_TTL + 1, 1.5, '600'):
            error = self.assertRaises(exception.InvalidRequest, self.identity.issue_token,
                                      ADMIN, ttl)
            self.assertIn('lifetime', str(error))
        with self.database.session() as session:
            self.assertEqual(0, session.query(models.ApiToken).count())

    def test_expired_tokens_are_deleted_now_and_then(self):
        self.conf.set_override('token_ttl', 60, 'api')
        identity = self.make_identity()
        old = identity.login(ADMIN, ADMIN_PASSWORD, 'here')['id']
        self.clock.advance(61)
        identity.login(ADMIN, ADMIN_PASSWORD, 'here')
        # Expired, but not deleted yet: the last purge (at the first login) is recent.
        self.assertIsNotNone(self.token_row(old))
        self.clock.advance(auth.PURGE_INTERVAL)
        fresh = identity.login(ADMIN, ADMIN_PASSWORD, 'here')['id']
        self.assertIsNone(self.token_row(old))
        self.assertIsNotNone(self.token_row(fresh))

    def test_a_role_change_holds_at_once_and_a_deleted_user_token_is_refused(self):
        self.identity.create_user('carol', 'carol-secret', 'member')
        token = self.identity.login('carol', 'carol-secret', 'here')['id']
        self.assertFalse(self.identity.validate(token).is_admin)
        self.identity.update_user('carol', role='admin')
        self.assertTrue(self.identity.validate(token).is_admin)
        self.identity.delete_user('carol')
        self.assertRaises(exception.Unauthorized, self.identity.validate, token)
        self.assertIsNone(self.token_row(token))

    def test_a_new_password_revokes_the_users_tokens_only(self):
        self.identity.create_user('carol', 'carol-secret', 'member')
        self.identity.create_user('dave', 'dave-secret', 'member')
        carols = [self.identity.login('carol', 'carol-secret', 'here')['id'] for _ in range(2)]
        daves = self.identity.login('dave', 'dave-secret', 'here')['id']
        self.identity.update_user('carol', role='admin')  # no password: the tokens stay
        self.assertEqual('carol', self.identity.validate(carols[0]).name)
        self.identity.update_user('carol', password='carol-secret-2')
        for token in carols:
            self.assertRaises(exception.Unauthorized, self.identity.validate, token)
            self.assertIsNone(self.token_row(token))
        self.assertEqual('dave', self.identity.validate(daves).name)
        fresh = self.identity.login('carol', 'carol-secret-2', 'here')['id']
        self.assertEqual('carol', self.identity.validate(fresh).name)

    def test_unknown_user_and_wrong_password_cost_the_same_and_say_the_same(self):
        hasher = CountingHasher()
        identity = self.make_identity(hasher)
        wrong = self.assertRaises(exception.Unauthorized, identity.login, ADMIN,
                                  'wrong-password', 'here')
        unknown = self.assertRaises(exception.Unauthorized, identity.login, 'nobody',
                                    ADMIN_PASSWORD, 'here')
        self.assertEqual(str(wrong), str(unknown))
        self.assertEqual(auth.LOGIN_REFUSED, str(wrong))
        # One verify each, the unknown user's against a hash of the same cost.
        stored, dummy = hasher.verified
        self.assertEqual(self.stored(ADMIN).password_hash, stored)
        self.assertEqual(stored.split('$')[:4], dummy.split('$')[:4])

    def test_a_hash_of_other_parameters_is_replaced_at_login(self):
        old = self.stored(ADMIN).password_hash
        stronger = argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
        self.make_identity(stronger).login(ADMIN, ADMIN_PASSWORD, 'here')
        new = self.stored(ADMIN).password_hash
        self.assertNotEqual(old, new)
        self.assertFalse(stronger.check_needs_rehash(new))
        self.assertTrue(stronger.verify(new, ADMIN_PASSWORD))
        # And one of the same parameters stays as it is.
        self.make_identity(stronger).login(ADMIN, ADMIN_PASSWORD, 'here')
        self.assertEqual(new, self.stored(ADMIN).password_hash)

    def test_too_many_failures_throttle_even_the_right_password(self):
        self.conf.set_override('login_attempts', 3, 'api')
        self.conf.set_override('login_window', 60, 'api')
        hasher = CountingHasher()
        identity = self.make_identity(hasher)
        for _ in range(3):
            self.assertRaises(exception.Unauthorized, identity.login, ADMIN, 'wrong-password',
                              'client-1')
        self.clock.advance(20)
        error = self.assertRaises(exception.LoginThrottled, identity.login, ADMIN,
                                  ADMIN_PASSWORD, 'client-2')
        self.assertEqual(40, error.retry_after)
        # Nothing was checked while throttled.
        self.assertEqual(3, len(hasher.verified))
        self.clock.advance(40)
        identity.login(ADMIN, ADMIN_PASSWORD, 'client-2')

    def test_logins_made_together_count_before_their_password_check(self):
        self.conf.set_override('login_attempts', 3, 'api')
        hasher = BlockingHasher(together=10)
        identity = self.make_identity(hasher)
        outcomes = []

        def attempt():
            try:
                identity.login(ADMIN, 'wrong-password', 'client')
            except exception.VmcloudError as exc:
                outcomes.append(type(exc).__name__)
        threads = [threading.Thread(target=attempt) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(3, len(hasher.verified))
        self.assertEqual({'Unauthorized': 3, 'LoginThrottled': 7},
                         dict(collections.Counter(outcomes)))

    def test_a_name_or_password_no_user_can_have_is_refused_and_not_tracked(self):
        identity = self.make_identity(CountingHasher())
        for name, password in (('a' * 65, ADMIN_PASSWORD), (ADMIN, 'p' * 1025)):
            error = self.assertRaises(exception.Unauthorized, identity.login, name, password,
                                      'client')
            self.assertEqual(auth.LOGIN_REFUSED, str(error))
        self.assertEqual({}, identity.throttle._by_name)


class BlockingHasher(CountingHasher):
    """Each verify waits until ``together`` logins are verifying at once (or a bound):
    logins made together, as uvicorn's thread pool runs them."""

    def __init__(self, together: int):
        super().__init__()
        self.barrier = threading.Barrier(together)

    def verify(self, password_hash, password) -> bool:
        try:
            self.barrier.wait(timeout=2)
        except threading.BrokenBarrierError:  # fewer came: the throttle stopped them
            pass
        return super().verify(password_hash, password)


class LoginThrottleTest(base.TestCase):

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.throttle = auth.LoginThrottle(attempts=3, window=60, clock=self.clock.monotonic)

    def fail(self, name: str, client: str, times: int = 1) -> None:
        for _ in range(times):
            self.throttle.check(name, client)
            self.throttle.failed(name, client)

    def test_per_name_from_any_address(self):
        self.fail('alice', 'a', 2)
        self.fail('alice', 'b')
        error = self.assertRaises(exception.LoginThrottled, self.throttle.check, 'alice', 'c')
        self.assertEqual(60, error.retry_after)
        self.throttle.check('bob', 'c')
        # A sliding window: the oldest failure leaving it lets one attempt in.
        self.clock.advance(59.5)
        self.assertEqual(1, self.assertRaises(exception.LoginThrottled, self.throttle.check,
                                              'alice', 'c').retry_after)
        self.clock.advance(0.5)
        self.throttle.check('alice', 'c')

    def test_per_address_for_any_name(self):
        self.fail('alice', 'a')
        self.clock.advance(10)
        self.fail('bob', 'a')
        self.fail('carol', 'a')
        error = self.assertRaises(exception.LoginThrottled, self.throttle.check, 'dave', 'a')
        self.assertEqual(50, error.retry_after)
        self.throttle.check('dave', 'b')

    def test_a_success_forgets_its_name_only(self):
        self.fail('alice', 'a', 2)
        self.fail('mallory', 'a')
        self.throttle.succeeded('mallory', 'a')
        # Mallory's own failure is forgotten, not alice's two from the address.
        self.fail('bob', 'a')
        self.assertRaises(exception.LoginThrottled, self.throttle.check, 'eve', 'a')
        self.throttle.succeeded('alice', 'a')
        self.throttle.check('alice', 'a')
        self.throttle.check('eve', 'a')

    def test_what_it_tracks_is_bounded(self):
        self.useFixture(fixtures.MonkeyPatch('vmcloud.api.auth.MAX_TRACKED', 10))
        for i in range(25):
            self.fail(f'user{i}', f'client{i}')
        self.assertLessEqual(len(self.throttle._by_name), 10)
        self.assertLessEqual(len(self.throttle._by_client), 10)
        # The latest ones are still counted.
        self.fail('user24', 'client24', 2)
        self.assertRaises(exception.LoginThrottled, self.throttle.check, 'user24', 'x')


class TokenRoutesTest(test_app.ApiTestCase):

    def login(self, name: str, password: str, client=None):
        return (client or self.client).post('/v1/auth/tokens', json={
            'username': name, 'password': password})

    def test_login_show_revoke(self):
        response = self.login(MEMBER, MEMBER_PASSWORD)
        self.assertEqual(201, response.status_code, response.text)
        token = response.json()['token']
        self.assertEqual(token['id'], response.headers['X-Subject-Token'])
        self.assertEqual('/v1/auth/tokens', response.headers['Location'])
        self.assertEqual({'name': MEMBER, 'role': 'member'}, token['user'])
        mine = self.make_test_client(token['id'])
        shown = mine.get('/v1/auth/tokens').json()['token']
        self.assertEqual({'expires_at': token['expires_at'], 'user': token['user']}, shown)
        bearer = self.make_test_client()
        bearer.headers['Authorization'] = f'Bearer {token["id"]}'
        self.assertEqual(MEMBER, bearer.get('/v1/auth/tokens').json()['token']['user']['name'])
        self.assertEqual(204, mine.delete('/v1/auth/tokens').status_code)
        for client in (mine, bearer):
            response = client.get('/v1/auth/tokens')
            self.assert_error(401, response)
            self.assertEqual('Token', response.headers['WWW-Authenticate'])
        # The member's other token is still good.
        self.assertEqual(200, self.member.get('/v1/auth/tokens').status_code)

    def test_bad_logins(self):
        wrong = self.assert_error(401, self.login(MEMBER, 'wrong-password'))
        unknown = self.assert_error(401, self.login('nobody', 'whatever-password'))
        self.assertEqual(wrong['message'], unknown['message'])
        self.assertNotIn('X-Subject-Token', self.login(MEMBER, 'wrong-password').headers)
        self.assert_error(422, self.client.post('/v1/auth/tokens', json={
            'username': MEMBER}), 'body.password')
        self.assert_error(422, self.client.post('/v1/auth/tokens', json={
            'username': MEMBER, 'password': 'x', 'extra': 1}), 'body.extra')
        # A cookie is no token.
        cookie = self.make_test_client()
        cookie.cookies.set('vmcloud_session', self.token(ADMIN, ADMIN_PASSWORD))
        self.assert_error(401, cookie.get('/v1/auth/tokens'))

    def test_failures_are_counted_to_the_callers_address(self):
        self.identity.throttle = auth.LoginThrottle(attempts=2, window=60)
        for name in ('nobody', 'noone'):
            self.assert_error(401, self.login(name, 'wrong-password'))
        self.assert_error(429, self.login(MEMBER, MEMBER_PASSWORD))
        # The TestClient's address ('testclient'), not a name shared by every caller.
        self.assertRaises(exception.LoginThrottled, self.identity.throttle.check,
                          'someone', 'testclient')
        self.identity.throttle.check('someone', 'elsewhere')

    def test_throttled_logins_are_429_with_retry_after(self):
        self.identity.throttle = auth.LoginThrottle(attempts=2, window=60)
        for _ in range(2):
            self.assert_error(401, self.login(MEMBER, 'wrong-password'))
        response = self.login(MEMBER, MEMBER_PASSWORD)
        self.assert_error(429, response, 'try again')
        self.assertLessEqual(int(response.headers['Retry-After']), 60)
        self.assertGreater(int(response.headers['Retry-After']), 0)
        self.assertNotIn('X-Subject-Token', response.headers)


class UserRoutesTest(test_app.ApiTestCase):

    def test_create_list_show_update_delete(self):
        response = self.admin.post('/v1/users', json={
            'name': 'carol', 'password': 'carol-secret', 'role': 'member'})
        self.assertEqual(201, response.status_code, response.text)
        self.assertEqual('/v1/users/carol', response.headers['Location'])
        user = response.json()['user']
        self.assertEqual({'name', 'role', 'created_at'}, set(user))
        listed = self.admin.get('/v1/users').json()
        self.assertEqual([ADMIN, 'carol', MEMBER], [u['name'] for u in listed['users']])
        self.assertEqual([], listed['users_links'])
        self.assertEqual(user, self.admin.get('/v1/users/carol').json()['user'])
        updated = self.admin.patch('/v1/users/carol', json={'role': 'admin'}).json()['user']
        self.assertEqual('admin', updated['role'])
        self.assertEqual(200, self.admin.patch('/v1/users/carol', json={
            'password': 'carol-secret-2'}).status_code)
        self.identity.login('carol', 'carol-secret-2', 'here')
        self.assertEqual(204, self.admin.delete('/v1/users/carol').status_code)
        self.assert_error(404, self.admin.get('/v1/users/carol'), 'carol')

    def test_members_and_anonymous_are_refused(self):
        for method, path, body in (('GET', '/v1/users', None),
                                   ('POST', '/v1/users', {'name': 'x', 'password': 'y' * 8,
                                                          'role': 'admin'}),
                                   ('GET', f'/v1/users/{MEMBER}', None),
                                   ('PATCH', f'/v1/users/{MEMBER}', {'role': 'admin'}),
                                   ('DELETE', f'/v1/users/{ADMIN}', None)):
            self.assert_error(403, self.member.request(method, path, json=body), 'admin')
            self.assert_error(401, self.client.request(method, path, json=body))
        self.assertEqual('member', self.identity.show_user(MEMBER)['role'])
        self.assertEqual([ADMIN, MEMBER], [u['name'] for u in self.identity.list_users()])

    def test_errors(self):
        self.assert_error(409, self.admin.post('/v1/users', json={
            'name': MEMBER, 'password': 'other-secret', 'role': 'admin'}), MEMBER)
        for body, field in (({'name': 'eve', 'password': 'short', 'role': 'member'},
                             'body.password'),
                            ({'name': 'eve', 'password': 'long-enough', 'role': 'root'},
                             'body.role'),
                            ({'name': 'Eve', 'password': 'long-enough', 'role': 'member'},
                             'body.name'),
                            ({'name': 'eve', 'password': 'long-enough'}, 'body.role')):
            self.assert_error(422, self.admin.post('/v1/users', json=body), field)
        self.assert_error(404, self.admin.get('/v1/users/eve'), 'eve')
        self.assert_error(404, self.admin.patch('/v1/users/nosuch', json={'role': 'admin'}))
        self.assert_error(404, self.admin.delete('/v1/users/nosuch'))
        self.assert_error(422, self.admin.patch(f'/v1/users/{MEMBER}', json={
            'role': 'root'}), 'body.role')
        self.assert_error(400, self.admin.get('/v1/users', params={'marker': 'nosuch'}),
                          'nosuch')
