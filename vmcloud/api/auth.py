"""Who calls the API: users with a password (an argon2 hash) and a role, and the tokens
they log in for, both in the dispatcher's database (tables api_users and api_tokens,
reached with vmcloud.db.api). No second identity service: Keystone could stand in front
of the API later as middleware that sets the user.

A token is 32 random bytes (URL-safe base64), valid for ``[api] token_ttl`` seconds; the
database holds only its sha256, so whoever reads the table cannot log in with it. A
request gives it as ``X-Auth-Token: TOKEN`` or ``Authorization: Bearer TOKEN``; never as a
cookie on /v1 (the dashboard has its own cookie and CSRF token).

Roles: ``admin`` may do everything; ``member`` may read everything and deploy, and
delete its own deployments.
"""
import collections
import dataclasses
import datetime
import hashlib
import logging
import math
import re
import secrets
import threading
import time
from typing import Callable

import argon2
import fastapi
from fastapi import security
from oslo_config import cfg

from vmcloud import exception
from vmcloud.api import context
from vmcloud.db import api as db_api

LOG = logging.getLogger(__name__)

ROLES = ('admin', 'member')
# Lower case only: 'Alice' and 'alice' must not be two users.
MAX_USER_NAME = 64
NAME_PATTERN = rf'^[a-z0-9][a-z0-9._-]{{0,{MAX_USER_NAME - 1}}}$'
MIN_PASSWORD = 8
# argon2 takes any length; this bounds the work a login asks of it.
MAX_PASSWORD = 1024
# The one message of every failed login: it does not tell a wrong password from an
# unknown user.
LOGIN_REFUSED = 'wrong user name or password'
# Expired tokens are deleted at a login at most this often (seconds).
PURGE_INTERVAL = 300.0
# The lifetimes (seconds) issue_token takes: [api] token_ttl's least, and a year with
# a day to spare (a token that never expires would outlive whoever made it).
MIN_TOKEN_TTL = 60
MAX_TOKEN_TTL = 366 * 24 * 3600
# Names and addresses the login throttle tracks at most (its memory is bounded).
MAX_TRACKED = 10000

_NAME = re.compile(NAME_PATTERN)


def utcnow() -> datetime.datetime:
    """Now, in UTC without tzinfo, as the database keeps times."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def token_id(token: str) -> str:
    """What the database keeps of ``token``: its sha256 in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == 'admin'

    def as_dict(self) -> dict:
        return {'name': self.name, 'role': self.role}


class LoginThrottle:
    """Failed logins, per user name and per client address: past ``attempts`` within
    ``window`` seconds, every login of that name, or from that address, is refused
    until the oldest of them is older than the window.

    In memory, in this process: each API process counts its own failures, and a restart
    forgets them. A success forgets the failures of its name (also those counted to its
    address), not those of other names from the same address.
    """

    def __init__(self, attempts: int, window: float,
                 clock: Callable[[], float] = time.monotonic):
        self._attempts = attempts
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        # key -> the times of its last ``attempts`` failures (and, per address, the
        # name each was for); oldest key first (a failure moves its key to the end).
        self._by_name: dict[str, collections.deque[float]] = {}
        self._by_client: dict[str, collections.deque[tuple[float, str]]] = {}

    def check(self, name: str, client: str) -> None:
        """:raises: LoginThrottled naming the seconds until the next attempt is taken."""
        with self._lock:
            self._check(name, client, self._clock())

    def begin(self, name: str, client: str) -> None:
        """An attempt starts: checked and counted as failed at once, in one step, so that
        attempts made together cannot all pass the check before any failed (the
        password check takes long); ``succeeded`` takes it back.

        :raises: LoginThrottled, counting nothing.
        """
        now = self._clock()
        with self._lock:
            self._check(name, client, now)
            self._record(name, client, now)

    def _check(self, name: str, client: str, now: float) -> None:
        wait = max(self._wait(self._by_name.get(name, ()), now),
                   self._wait([at for at, _ in self._by_client.get(client, ())], now))
        if wait > 0:
            raise exception.LoginThrottled(max(1, math.ceil(wait)))

    def _wait(self, failures, now: float) -> float:
        """Seconds until fewer than ``attempts`` of ``failures`` lie within the window."""
        if len(failures) < self._attempts:
            return 0.0
        oldest = failures[-self._attempts]
        return oldest + self._window - now

    def failed(self, name: str, client: str) -> None:
        with self._lock:
            self._record(name, client, self._clock())

    def _record(self, name: str, client: str, now: float) -> None:
        _append(self._by_name, name, now, self._attempts)
        _append(self._by_client, client, (now, name), self._attempts)
        for tracked in (self._by_name, self._by_client):
            if len(tracked) > MAX_TRACKED:
                self._forget_old(tracked, now)

    def succeeded(self, name: str, client: str) -> None:
        with self._lock:
            self._by_name.pop(name, None)
            failures = self._by_client.get(client)
            if failures is not None:
                kept = [(at, other) for at, other in failures if other != name]
                if kept:
                    self._by_client[client] = collections.deque(kept, maxlen=self._attempts)
                else:
                    del self._by_client[client]

    def _forget_old(self, tracked: dict, now: float) -> None:
        """Drop the keys whose last failure is out of the window; if that is not enough,
        the keys failed longest ago (they count less from now on: memory stays bounded)."""
        def last(failures) -> float:
            newest = failures[-1]
            return newest[0] if isinstance(newest, tuple) else newest
        for key in [k for k, failures in tracked.items() if last(failures) <= now - self._window]:
            del tracked[key]
        while len(tracked) > MAX_TRACKED:
            del tracked[next(iter(tracked))]


def _append(tracked: dict, key: str, value, attempts: int) -> None:
    failures = tracked.pop(key, None)
    if failures is None:
        failures = collections.deque(maxlen=attempts)
    failures.append(value)
    tracked[key] = failures


class Identity:
    """The API's users and tokens, over vmcloud.db.api's api_* functions. Hashing (tens
    of milliseconds, on purpose) is done outside any unit of work: SQLite has one writer
    at a time."""

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database,
                 now: Callable[[], datetime.datetime] = utcnow,
                 monotonic: Callable[[], float] = time.monotonic,
                 hasher: argon2.PasswordHasher | None = None):
        """``now`` (UTC, naive), ``monotonic``: the clocks; ``hasher``: by default
        argon2-cffi's with its defaults (a test's may be cheaper: a login rehashes a
        password whose hash has other parameters than the hasher's)."""
        self._db = db
        self._ttl = datetime.timedelta(seconds=conf.api.token_ttl)
        self._now = now
        self._monotonic = monotonic
        self._hasher = hasher or argon2.PasswordHasher()
        # Verified against when the user is unknown: a login takes as long either way.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        self.throttle = LoginThrottle(conf.api.login_attempts, conf.api.login_window,
                                      monotonic)
        self._last_purge: float | None = None
        self._purge_lock = threading.Lock()

    # -- users ---------------------------------------------------------------------

    def create_user(self, name: str, password: str, role: str) -> dict:
        """:returns: {'name', 'role', 'created_at'}.
        :raises: InvalidRequest (a bad name or role, a password shorter than 8);
            NameInUse."""
        _check_name(name)
        _check_role(role)
        password_hash = self._hash(password)
        try:
            with self._db.session() as session:
                if db_api.api_user_get(session, name) is not None:
                    raise exception.NameInUse('user', name)
                user = db_api.api_user_create(session, name, password_hash, role)
                shown = _user_dict(user)
        except db_api.Conflict as exc:  # made by another request meanwhile
            raise exception.NameInUse('user', name) from exc
        LOG.info('user %s created, role %s', name, role)
        return shown

    def update_user(self, name: str, password: str | None = None,
                    role: str | None = None) -> dict:
        """A new role holds at once for the user's tokens. A new password revokes every
        token of the user, in the same unit of work: a password is changed because the
        old one may be known, and so may the tokens logged in with it.

        :raises: UserNotFound; InvalidRequest (a bad role or password)."""
        if role is not None:
            _check_role(role)
        password_hash = self._hash(password) if password is not None else None
        revoked = 0
        with self._db.session() as session:
            user = self._user(session, name)
            if password_hash is not None:
                user.password_hash = password_hash
                revoked = db_api.api_tokens_delete_of(session, user)
            if role is not None:
                user.role = role
            shown = _user_dict(user)
        LOG.info('user %s updated:%s%s', name,
                 f' password ({revoked} tokens revoked)' if password_hash else '',
                 f' role {role}' if role else '')
        return shown

    def delete_user(self, name: str) -> None:
        """The user and its tokens. :raises: UserNotFound."""
        with self._db.session() as session:
            db_api.api_user_delete(session, self._user(session, name))
        LOG.info('user %s deleted', name)

    def show_user(self, name: str) -> dict:
        """:raises: UserNotFound."""
        with self._db.session() as session:
            return _user_dict(self._user(session, name))

    def list_users(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """Users by name (``limit`` after ``marker``). :raises: MarkerNotFound."""
        with self._db.session() as session:
            return [_user_dict(user) for user in db_api.api_users(session, limit, marker)]

    @staticmethod
    def _user(session: db_api.Session, name: str):
        user = db_api.api_user_get(session, name)
        if user is None:
            raise exception.UserNotFound(name)
        return user

    def _hash(self, password: str) -> str:
        if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise exception.InvalidRequest(
                f'a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters')
        return self._hasher.hash(password)

    # -- tokens --------------------------------------------------------------------

    def login(self, name: str, password: str, client: str) -> dict:
        """A new token for user ``name`` if ``password`` is its password; ``client``:
        the caller's address, for the throttle.

        :returns: {'id': the token, 'expires_at', 'user': {'name', 'role'}}.
        :raises: LoginThrottled (too many failures of the name or the address: nothing
            is checked); Unauthorized (a wrong password or an unknown user, the same
            message after the same work).
        """
        if not (isinstance(name, str) and isinstance(password, str)
                and len(name) <= MAX_USER_NAME and len(password) <= MAX_PASSWORD):
            # No such user can exist: refused before the throttle keeps a key this long.
            raise exception.Unauthorized(LOGIN_REFUSED)
        self.throttle.begin(name, client)
        with self._db.session() as session:
            user = db_api.api_user_get(session, name)
            stored = None if user is None else (user.password_hash, user.role)
        verified = self._verified(stored[0] if stored else self._dummy_hash, password)
        if stored is None or not verified:
            LOG.info('login of %s from %s refused', name, client)
            raise exception.Unauthorized(LOGIN_REFUSED)
        self.throttle.succeeded(name, client)
        rehashed = (self._hasher.hash(password)
                    if self._hasher.check_needs_rehash(stored[0]) else None)
        with self._db.session() as session:
            user = db_api.api_user_get(session, name)
            if user is None:  # deleted meanwhile
                raise exception.Unauthorized(LOGIN_REFUSED)
            if rehashed is not None:
                user.password_hash = rehashed
            token = self._new_token(session, user, self._ttl)
        LOG.info('user %s logged in from %s', name, client)
        return token

    def issue_token(self, name: str, ttl: int | None = None) -> dict:
        """A token for user ``name`` without its password, valid ``ttl`` seconds
        (default ``[api] token_ttl``, at most MAX_TOKEN_TTL): for whoever can write the
        database anyway (the operator on the API's host, ``vmcloud user token``), such
        as a scrape job's token, which must outlive token_ttl.

        :returns: as login's. :raises: UserNotFound; InvalidRequest (a ttl out of
            range).
        """
        if ttl is None:
            lifetime = self._ttl
        elif isinstance(ttl, int) and MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
            lifetime = datetime.timedelta(seconds=ttl)
        else:
            raise exception.InvalidRequest(
                f'bad token lifetime {ttl!r}: {MIN_TOKEN_TTL} to {MAX_TOKEN_TTL} seconds')
        with self._db.session() as session:
            token = self._new_token(session, self._user(session, name), lifetime)
        LOG.info('token issued for user %s without a login, valid until %s', name,
                 token['expires_at'])
        return token

    def _new_token(self, session: db_api.Session, user, lifetime: datetime.timedelta
                   ) -> dict:
        """A new token of ``user`` (an api_users row), stored as its sha256."""
        token = secrets.token_urlsafe(32)
        now = self._now()
        expires_at = now + lifetime
        db_api.api_token_create(session, token_id(token), user.name, expires_at)
        self._purge_now_and_then(session, now)
        return {'id': token, 'expires_at': expires_at.isoformat(),
                'user': {'name': user.name, 'role': user.role}}

    def _verified(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    def _purge_now_and_then(self, session: db_api.Session, now: datetime.datetime) -> None:
        with self._purge_lock:
            due = (self._last_purge is None
                   or self._monotonic() - self._last_purge >= PURGE_INTERVAL)
            if due:
                self._last_purge = self._monotonic()
        if due:
            purged = db_api.api_tokens_delete_expired(session, now)
            if purged:
                LOG.info('%d expired tokens deleted', purged)

    def validate(self, token: str) -> User:
        """:raises: Unauthorized for an unknown, revoked or expired token (or its user
        deleted)."""
        return self._token(token)[0]

    def show_token(self, token: str) -> dict:
        """:returns: {'expires_at', 'user': {'name', 'role'}}. :raises: Unauthorized."""
        user, expires_at = self._token(token)
        return {'expires_at': expires_at.isoformat(), 'user': user.as_dict()}

    def _token(self, token: str) -> tuple[User, datetime.datetime]:
        if not token:
            raise exception.Unauthorized('authentication required')
        with self._db.session() as session:
            row = db_api.api_token_get(session, token_id(token))
            if row is None or row.expires_at <= self._now():
                raise exception.Unauthorized('the token is unknown or expired')
            user = db_api.api_user_get(session, row.user)
            if user is None:
                raise exception.Unauthorized('the token is unknown or expired')
            return User(user.name, user.role), row.expires_at

    def revoke(self, token: str) -> None:
        """The token is refused from now on (nothing happens for an unknown one)."""
        with self._db.session() as session:
            row = db_api.api_token_get(session, token_id(token))
            if row is not None:
                db_api.api_token_delete(session, row)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise exception.InvalidRequest(
            f'bad user name {name!r}: 1 to 64 of a-z 0-9 . _ -, starting with a letter or '
            'a digit')


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise exception.InvalidRequest(f'bad role {role!r}: one of {", ".join(ROLES)}')


def _user_dict(user) -> dict:
    return {'name': user.name, 'role': user.role, 'created_at': user.created_at.isoformat()}


# -- FastAPI dependencies -------------------------------------------------------------

# For the OpenAPI document (its security schemes); current_user reads the headers itself.
_token_header = security.APIKeyHeader(
    name='X-Auth-Token', auto_error=False, scheme_name='token',
    description='A token from POST /v1/auth/tokens')
_bearer = security.HTTPBearer(auto_error=False, scheme_name='bearer',
                              description='The same token as Authorization: Bearer TOKEN')


def client_address(request: fastapi.Request) -> str:
    """The address ``request`` came from, as the login throttle counts failures of it
    ('' when the server does not know it)."""
    return request.client.host if request.client is not None else ''


def request_token(request: fastapi.Request) -> str | None:
    """The token of ``request``: its X-Auth-Token header, or its Authorization: Bearer
    one (never a cookie)."""
    token = request.headers.get('X-Auth-Token', '').strip()
    if token:
        return token
    scheme, _, credentials = request.headers.get('Authorization', '').partition(' ')
    if scheme.lower() == 'bearer' and credentials.strip():
        return credentials.strip()
    return None


def current_user(request: fastapi.Request,
                 services: context.Services = fastapi.Depends(context.services),
                 _header: str | None = fastapi.Security(_token_header),
                 _authorization=fastapi.Security(_bearer)) -> User:
    """The dependency of every /v1 route but the login, and of /metrics: the caller,
    also kept in ``request.state.user`` (the access log names it).

    :raises: Unauthorized (401) without a valid, unexpired token.
    """
    token = request_token(request)
    if token is None:
        raise exception.Unauthorized(
            'authentication required: an X-Auth-Token header with a token from '
            'POST /v1/auth/tokens')
    user = services.identity.validate(token)
    request.state.user = user
    return user


def require_admin(user: User = fastapi.Depends(current_user)) -> User:
    """:raises: Forbidden (403) for a member."""
    check_admin(user)
    return user


def check_admin(user: User) -> None:
    """:raises: Forbidden unless ``user`` is an admin."""
    if not user.is_admin:
        raise exception.Forbidden(f'user {user.name} is a {user.role}: this needs the admin '
                                  'role')
