"""``vmcloud user create|list|delete|password``: the API's users in the database
directly, passwords from a file or stdin (never an argument), errors on one line."""
import contextlib
import datetime
import io
import json
import os
import re

import fixtures

from tests import base
from tests.unit.api import test_app
from vmcloud import exception
from vmcloud.api import auth
from vmcloud.cmd import cli
from vmcloud.db import api as db_api


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class UserCommandsTest(base.TestCase):

    def setUp(self):
        super().setUp()
        connection = f'sqlite:///{self.tmp}/vmcloud.sqlite'
        self.config = self.write_config(database={'connection': connection})
        self.conf.set_override('connection', connection, 'database')  # for identity()
        # argon2-cffi's defaults cost a good part of a second per hash.
        self.useFixture(fixtures.MockPatchObject(auth.argon2, 'PasswordHasher',
                                                 lambda: test_app.FAST_HASHER))

    def vmcloud(self, *args: str, stdin: str = '', tty: bool = False) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.useFixture(fixtures.MonkeyPatch('sys.stdin', (Terminal if tty else io.StringIO)(
            stdin)))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(['--config-file', self.config, 'user', *args])
            except SystemExit as exc:  # argparse
                status = exc.code
        return status, out.getvalue(), err.getvalue()

    def password_file(self, text: str) -> str:
        path = os.path.join(self.tmp, 'password')
        with open(path, 'w') as f:
            f.write(text)
        return path

    def identity(self) -> auth.Identity:
        database = db_api.Database(self.conf)
        database.upgrade()
        self.addCleanup(database.dispose)
        return auth.Identity(self.conf, database, hasher=test_app.FAST_HASHER)

    def test_create_from_stdin_and_from_a_file_list_delete(self):
        status, out, err = self.vmcloud('create', 'alice', '--role', 'admin', '-f', 'json',
                                        stdin='alice-secret\nignored\n')
        self.assertEqual((0, ''), (status, err))
        self.assertEqual({'name': 'alice', 'role': 'admin'},
                         {k: v for k, v in json.loads(out).items() if k != 'created_at'})
        path = self.password_file('bob-secret-1\r\nsecond line\n')
        self.assertEqual(0, self.vmcloud('create', 'bob', '--role', 'member',
                                         '--password-file', path)[0])
        status, out, _ = self.vmcloud('list', '-f', 'json')
        self.assertEqual([('alice', 'admin'), ('bob', 'member')],
                         [(u['name'], u['role']) for u in json.loads(out)])
        status, table, _ = self.vmcloud('list')
        self.assertIn('| alice', table)
        self.assertIn('created_at', table)
        users = self.identity()
        users.login('alice', 'alice-secret', 'here')
        users.login('bob', 'bob-secret-1', 'here')
        self.assertEqual((0, '', ''), self.vmcloud('delete', 'bob'))
        self.assertEqual(['alice'], [u['name'] for u in users.list_users()])

    def test_password_changes_it_and_revokes_the_users_tokens(self):
        self.vmcloud('create', 'alice', '--role', 'member', stdin='alice-secret\n')
        token = self.identity().login('alice', 'alice-secret', 'here')['id']
        self.assertEqual(0, self.vmcloud('password', 'alice', stdin='alice-secret-2\n')[0])
        users = self.identity()
        users.login('alice', 'alice-secret-2', 'here')
        self.assertRaises(exception.Unauthorized, users.login, 'alice', 'alice-secret', 'here')
        self.assertRaises(exception.Unauthorized, users.validate, token)

    def test_token_issues_one_without_the_password(self):
        self.vmcloud('create', 'scraper', '--role', 'member', stdin='scraper-secret\n')
        self.conf.set_override('token_ttl', 900, 'api')
        for args, ttl in (((), 900), (('--ttl', str(auth.MAX_TOKEN_TTL)), auth.MAX_TOKEN_TTL)):
            before = auth.utcnow()
            status, out, err = self.vmcloud('token', 'scraper', '-f', 'json', *args,
                                            stdin='not read\n')
            after = auth.utcnow()
            self.assertEqual((0, ''), (status, err))
            token = json.loads(out)
            self.assertEqual({'name': 'scraper', 'role': 'member'}, token['user'])
            self.assertEqual('scraper', self.identity().validate(token['id']).name)
            expires_at = datetime.datetime.fromisoformat(token['expires_at'])
            lifetime = datetime.timedelta(seconds=ttl)
            self.assertTrue(before + lifetime <= expires_at <= after + lifetime,
                            (before, expires_at, after))
        status, table, err = self.vmcloud('token', 'scraper')
        self.assertEqual((0, ''), (status, err))
        shown = dict(re.findall(r'^\| (\S+)\s+\| (\S+)\s+\|$', table, re.MULTILINE))
        self.assertEqual(('scraper', 'member'), (shown['user'], shown['role']))
        self.assertEqual('scraper', self.identity().validate(shown['id']).name)

    def test_errors_exit_non_zero_naming_the_problem(self):
        self.vmcloud('create', 'alice', '--role', 'admin', stdin='alice-secret\n')
        for args, stdin, fragment in (
                (('create', 'alice', '--role', 'member'), 'other-secret\n', 'alice exists'),
                (('create', 'carol', '--role', 'member'), 'short\n', 'password'),
                (('create', 'carol', '--role', 'member'), '', 'no password'),
                (('create', 'carol', '--role', 'member'), '\n', 'no password'),
                (('create', 'Carol', '--role', 'member'), 'long-enough\n', "'Carol'"),
                (('create', 'carol', '--role', 'member', '--password-file',
                  os.path.join(self.tmp, 'nosuch')), '', 'nosuch'),
                (('delete', 'nobody'), '', 'user nobody not found'),
                (('password', 'nobody'), 'long-enough\n', 'user nobody not found'),
                (('token', 'nobody'), '', 'user nobody not found'),
                (('token', 'alice', '--ttl', str(auth.MAX_TOKEN_TTL + 1)), '', 'lifetime'),
                (('token', 'alice', '--ttl', '0'), '', 'lifetime')):
            status, out, err = self.vmcloud(*args, stdin=stdin)
            self.assertEqual(1, status, (args, out, err))
            self.assertEqual(1, len(err.splitlines()), err)
            self.assertTrue(err.startswith('vmcloud: error: '), err)
            self.assertIn(fragment, err)
        self.assertEqual([('alice', 'admin')], [(u['name'], u['role'])
                                                for u in self.identity().list_users()])

    def test_no_password_on_the_command_line_and_a_role_is_needed(self):
        for args in (('create', 'carol', '--role', 'member', '--password', 'x' * 10),
                     ('password', 'carol', '--password', 'x' * 10),
                     ('create', 'carol'), ('create', 'carol', '--role', 'root'), ()):
            status, _, err = self.vmcloud(*args, stdin='long-enough\n')
            self.assertEqual(2, status, (args, err))
        self.assertEqual([], self.identity().list_users())

    def test_stdin_a_terminal_is_asked_without_echo(self):
        asked = self.useFixture(fixtures.MockPatch('getpass.getpass',
                                                   return_value='typed-secret')).mock
        self.assertEqual(0, self.vmcloud('create', 'carol', '--role', 'member', tty=True,
                                         stdin='not-this-one\n')[0])
        asked.assert_called_once()
        self.identity().login('carol', 'typed-secret', 'here')
