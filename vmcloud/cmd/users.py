"""``vmcloud user create|list|delete|password|token``: the REST API's users, in the
database (``[database] connection``) directly, so that the first admin can be made
before any API runs, and a token issued without a password (``token``: for a job, such
as a scrape of /metrics, whose token must outlive ``[api] token_ttl``; whoever can write
the database can anyway).

A password is never an argument (other users of the machine see a process's
arguments): ``--password-file F`` gives its first line, else it is read from stdin (one
line; without echo on a terminal).
"""
import argparse
import getpass
import sys

from oslo_config import cfg

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.cmd import common
from vmcloud.cmd import output
from vmcloud.db import api as db_api

COLUMNS = ('name', 'role', 'created_at')


def identity(conf: cfg.ConfigOpts) -> auth.Identity:
    """:raises: ConfigError, DatabaseError."""
    database = db_api.Database(conf)
    database.upgrade()
    return auth.Identity(conf, database)


def read_password(path: str | None) -> str:
    """The first line of ``path``, or one line of stdin, without its line end.

    :raises: InvalidRequest if it is empty; OSError if the file cannot be read.
    """
    if path is not None:
        with open(path, encoding='utf-8') as f:
            line = f.readline()
    elif sys.stdin.isatty():
        line = getpass.getpass('password: ')
    else:
        line = sys.stdin.readline()
    password = line.rstrip('\r\n')
    if not password:
        raise exception.InvalidRequest(
            f'no password in {path or "stdin"}: give it as its first line')
    return password


def do_create(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: InvalidRequest (a bad name, role or password), NameInUse."""
    users = identity(conf)
    user = users.create_user(args.name, read_password(args.password_file), args.role)
    output.emit_record(user, args.fmt)
    return 0


def do_list(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    output.emit(identity(conf).list_users(), COLUMNS, args.fmt)
    return 0


def do_delete(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: UserNotFound."""
    identity(conf).delete_user(args.name)
    return 0


def do_password(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: UserNotFound, InvalidRequest (a bad password)."""
    users = identity(conf)
    users.show_user(args.name)  # an unknown user before asking for a password
    users.update_user(args.name, password=read_password(args.password_file))
    return 0


def do_token(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: UserNotFound, InvalidRequest (a bad --ttl)."""
    token = identity(conf).issue_token(args.name, args.ttl)
    if args.fmt == 'json':
        output.emit_record(token, args.fmt)
    else:
        output.emit_record({'id': token['id'], 'expires_at': token['expires_at'],
                            'user': token['user']['name'], 'role': token['user']['role']},
                           args.fmt)
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    formatted = common.format_parent()
    password = argparse.ArgumentParser(add_help=False)
    password.add_argument('--password-file', metavar='FILE',
                          help='read the password from the first line of FILE (default: '
                               'one line of stdin)')
    user = groups.add_parser('user', help="manage the REST API's users",
                             description="The REST API's users and their roles: admin "
                                         '(everything) or member (read, deploy, delete '
                                         'its own deployments).')
    actions = user.add_subparsers(dest='action', metavar='ACTION', required=True)
    # No abbreviations: `--password SECRET` must be refused, not read as a file's name.
    sub = actions.add_parser('create', parents=[formatted, password], help='add a user',
                             allow_abbrev=False)
    sub.set_defaults(handler=do_create, log=False)
    sub.add_argument('name')
    sub.add_argument('--role', choices=auth.ROLES, required=True)
    sub = actions.add_parser('list', parents=[formatted], help='list the users')
    sub.set_defaults(handler=do_list, log=False)
    sub = actions.add_parser('delete', help='delete a user and its tokens')
    sub.set_defaults(handler=do_delete, log=False)
    sub.add_argument('name')
    sub = actions.add_parser('password', parents=[password], help="change a user's password",
                             allow_abbrev=False)
    sub.set_defaults(handler=do_password, log=False)
    sub.add_argument('name')
    sub = actions.add_parser(
        'token', parents=[formatted], help='issue a token for a user, without its password',
        description='Issue a token for user NAME directly in the database (no password: '
                    "run it on the API's host), e.g. for a job scraping /metrics whose "
                    'token must outlive [api] token_ttl. It is printed: keep it secret.')
    sub.set_defaults(handler=do_token, log=False)
    sub.add_argument('name')
    sub.add_argument('--ttl', type=int, metavar='SECONDS',
                     help='seconds it stays valid (default: [api] token_ttl; '
                          f'{auth.MIN_TOKEN_TTL} to {auth.MAX_TOKEN_TTL})')
