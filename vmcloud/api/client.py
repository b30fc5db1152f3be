"""A python client of vmcloud's REST API: the dispatcher's client methods over HTTP.

``Client`` offers the methods of ``vmcloud.dispatcher.rpcapi.DispatcherAPI`` that the
commands use, with the same names, arguments and answers (a REST body's one object
unwrapped: ``{"cloud": {...}}`` is the cloud; a list is every page of it), and raises
the VmcloudError the answer stands for, so a command takes either client.

A session (``Session``) holds one HTTP connection pool and the token: given none, it
logs in with the username and password at its first request, and once more when a
request of a token it got that way is refused (the token expired).
"""
import os
import urllib.parse
from typing import Callable, Iterator

import httpx

from vmcloud import exception
from vmcloud import polling
from vmcloud import rpc
from vmcloud.dispatcher import states

TOKEN_HEADER = 'X-Auth-Token'
SUBJECT_TOKEN_HEADER = 'X-Subject-Token'
REQUEST_ID_HEADER = 'X-OpenStack-Request-ID'
# The dispatcher's snapshot call waits out the cut (freeze, barrier, thaw of an abort):
# with the default options up to 240 s, so the API answers no sooner.
SNAPSHOT_TIMEOUT = 600.0
UPLOAD_CHUNK = 1 << 20


class ApiUnreachable(exception.ApiError):
    """No answer from the API at all: refused, unresolvable, timed out, not HTTP."""

    def __init__(self, url: str, reason: str):
        self.url = url
        self.reason = reason
        super().__init__(0, f'cannot reach the vmcloud API at {url}: {reason}')


# -- errors ----------------------------------------------------------------------

# What a status stands for when the answer names no class of vmcloud.exception.
_BY_STATUS = {400: exception.InvalidRequest, 409: exception.InvalidRequest,
              422: exception.InvalidRequest}


def error_of(status: int, message: str, request_id: str = '',
             retry_after: str | None = None, type_name: str | None = None,
             fields: dict | None = None) -> exception.VmcloudError:
    """The VmcloudError an API error answer stands for, its message the API's.

    ``type_name`` and ``fields``: the body's ``type`` and ``fields``. A type naming a
    VmcloudError subclass of vmcloud.exception is raised again as that class with those
    fields (``rpc.rebuilt_error``); without one (FastAPI's own errors, an older API,
    another server), the status says what it is. Every one carries ``status`` and
    ``request_id`` (the id of the request in the API's log); an ApiError, standing for
    no other class, says them in its message.
    """
    cls = rpc.error_class(type_name) if isinstance(type_name, str) else None
    if cls is not None and cls is not exception.VmcloudError:
        error = rpc.rebuilt_error(type_name, message,
                                  fields if isinstance(fields, dict) else {})
    elif status == 401:
        error = exception.Unauthorized(message)
    elif status == 403:
        error = exception.Forbidden(message)
    elif status == 429:
        error = rpc.rebuilt_error(exception.LoginThrottled.__name__, message,
                                  {'retry_after': _seconds(retry_after)})
    elif status in _BY_STATUS:
        error = _BY_STATUS[status](message)
    else:
        said = f'{message} (HTTP {status}' + (f', request {request_id})'
                                              if request_id else ')')
        return exception.ApiError(status, said, request_id)
    error.status = status
    error.request_id = request_id
    return error


def _seconds(header: str | None) -> int:
    try:
        return max(int(header or 0), 0)
    except ValueError:
        return 0


def _answered_error(response: httpx.Response) -> exception.VmcloudError:
    """The error of an answer of status 400 or above: the API's error body, or (another
    server answered) the status and the start of what it said."""
    request_id = response.headers.get(REQUEST_ID_HEADER, '')
    type_name = fields = None
    try:
        body = response.json()['error']
        message = str(body['message'])
        request_id = str(body.get('request_id') or request_id)
        type_name, fields = body.get('type'), body.get('fields')
    except (ValueError, KeyError, TypeError, AttributeError):
        said = response.text.strip()[:200]
        message = f'{response.status_code} {response.reason_phrase} from {response.url}' + (
            f': {said}' if said else '')
    return error_of(response.status_code, message, request_id,
                    response.headers.get('Retry-After'), type_name, fields)


# -- the session ----------------------------------------------------------------------

def _root(url: str) -> str:
    """The API's root URL, as ``url`` names it (with or without its /v1).

    :raises: ConfigError unless ``url`` is an http(s) URL with a host.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise exception.ConfigError(f'bad vmcloud API URL {url!r}: {exc}') from exc
    if parsed.scheme not in ('http', 'https') or not parsed.host:
        raise exception.ConfigError(f'bad vmcloud API URL {url!r}: not http(s)://HOST[:PORT]')
    return url.rstrip('/').removesuffix('/v1')


class Session:
    """Requests to the API at ``url``: authenticated, their error answers raised."""

    def __init__(self, url: str, token: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 30.0,
                 connect_timeout: float | None = None,
                 transport: httpx.BaseTransport | None = None):
        """``token``, or ``username`` and ``password`` to log in with; ``timeout``: the
        seconds an answer may take (``connect_timeout``: reaching the API, by default
        as long); ``transport``: httpx's (a test's MockTransport).

        :raises: ConfigError for a bad URL, or neither a token nor both credentials.
        """
        self.url = _root(url)
        if not token and not (username and password):
            raise exception.ConfigError(
                f'the vmcloud API at {self.url} needs a token, or a username and password')
        self.username = username
        self._password = password
        self._token = token or None
        self.timeout = timeout
        self._http = httpx.Client(
            base_url=self.url, transport=transport,
            timeout=httpx.Timeout(timeout, connect=connect_timeout or timeout))

    def close(self) -> None:
        self._http.close()

    @property
    def token(self) -> str | None:
        return self._token

    def login(self) -> dict:
        """Log in with the username and password: the new token's body ({'id',
        'expires_at', 'user'}) becomes the session's.

        :raises: Unauthorized naming the user and the API; LoginThrottled; ApiError.
        """
        response = self._send('POST', '/v1/auth/tokens', authenticated=False,
                              json={'username': self.username, 'password': self._password})
        if response.status_code == 401:
            raise exception.Unauthorized(f'the vmcloud API at {self.url} refused the login '
                                         f'of user {self.username}: {_message(response)}')
        token = self._answer(response).json()['token']
        self._token = response.headers.get(SUBJECT_TOKEN_HEADER) or token['id']
        return token

    def request(self, method: str, path: str, *, params: dict | None = None,
                json: dict | None = None, content: Callable[[], Iterator[bytes]] | None = None,
                headers: dict | None = None, timeout: float | None = None) -> httpx.Response:
        """The answer of status below 400 to one request, logged in first if need be.

        ``content``: makes the body anew (it is sent again after a new login).
        :raises: the VmcloudError an error answer stands for (see ``error_of``);
            ApiUnreachable naming the URL.
        """
        logged_in = False
        if self._token is None:
            self.login()
            logged_in = True
        response = self._send(method, path, params=params, json=json, content=content,
                              headers=headers, timeout=timeout)
        if response.status_code == 401 and self._password and not logged_in:
            # The token expired (or was revoked): one new login, then the answer stands.
            self.login()
            response = self._send(method, path, params=params, json=json, content=content,
                                  headers=headers, timeout=timeout)
        if response.status_code == 401 and not self._password:
            raise exception.Unauthorized(f'the vmcloud API at {self.url} refused the token: '
                                         f'{_message(response)}')
        return self._answer(response)

    def body(self, method: str, path: str, **kwargs) -> dict:
        """The JSON body of ``request``'s answer ({} for none)."""
        response = self.request(method, path, **kwargs)
        return response.json() if response.content else {}

    def every_page(self, path: str, collection: str, params: dict | None = None,
                   limit: int | None = None) -> list[dict]:
        """The items of ``collection`` on every page from ``path`` on, following each
        next link (at most ``limit`` of them).

        :raises: ApiError if a next link comes round again.
        """
        params = {k: v for k, v in (params or {}).items() if v is not None}
        if limit is not None:
            params['limit'] = limit
        items: list[dict] = []
        seen = set()
        target: str | None = path
        while target is not None and (limit is None or len(items) < limit):
            body = self.body('GET', target, params=params)
            items += body[collection]
            params = None   # a next link holds the query
            target = next((link['href'] for link in body.get(f'{collection}_links', [])
                           if link.get('rel') == 'next'), None)
            if target in seen:
                raise exception.ApiError(0, f'the vmcloud API at {self.url} links {target} '
                                            'as the next page again')
            seen.add(target)
        return items if limit is None else items[:limit]

    def _send(self, method: str, path: str, *, authenticated: bool = True,
              params: dict | None = None, json: dict | None = None,
              content: Callable[[], Iterator[bytes]] | None = None,
              headers: dict | None = None, timeout: float | None = None) -> httpx.Response:
        headers = dict(headers or {})
        if authenticated:
            headers[TOKEN_HEADER] = self._token
        extra = {} if timeout is None else {'timeout': timeout}
        try:
            return self._http.request(method, path, params=params, json=json,
                                      content=None if content is None else content(),
                                      headers=headers, **extra)
        except httpx.TimeoutException as exc:
            raise ApiUnreachable(self.url, f'no answer within {timeout or self.timeout:g} s '
                                           f'({type(exc).__name__})') from exc
        except httpx.TransportError as exc:
            raise ApiUnreachable(self.url, str(exc) or type(exc).__name__) from exc

    @staticmethod
    def _answer(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise _answered_error(response)
        return response


def _message(response: httpx.Response) -> str:
    return str(_answered_error(response))


# -- the client -----------------------------------------------------------------------

def _given(**fields) -> dict:
    """The optional ``fields`` that were given (the API defaults the others)."""
    return {name: value for name, value in fields.items() if value is not None}


def _path(*parts) -> str:
    """A path of the API, each of ``parts`` quoted: a name or id is one segment."""
    return '/v1/' + '/'.join(urllib.parse.quote(str(part), safe='') for part in parts)


class Client:
    """The REST API as the dispatcher's client methods (see the module's docstring)."""

    def __init__(self, url: str, token: str | None = None, username: str | None = None,
                 password: str | None = None, timeout: float = 30.0,
                 connect_timeout: float | None = None,
                 transport: httpx.BaseTransport | None = None):
        """As ``Session``'s. :raises: ConfigError (a bad URL, no credentials)."""
        self.session = Session(url, token, username, password, timeout, connect_timeout,
                               transport)

    @property
    def url(self) -> str:
        return self.session.url

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> 'Client':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _one(self, key: str, method: str, *path, **kwargs) -> dict:
        return self.session.body(method, _path(*path), **kwargs)[key]

    # -- tokens and users (admin) -------------------------------------------------------

    def login(self) -> dict:
        """A new token for the username and password: {'id', 'expires_at', 'user'}."""
        return self.session.login()

    def show_token(self) -> dict:
        """The session's token: {'expires_at', 'user': {'name', 'role'}}."""
        return self._one('token', 'GET', 'auth', 'tokens')

    def revoke_token(self) -> None:
        """Revoke the session's token: the next request logs in anew, if it can."""
        self.session.request('DELETE', _path('auth', 'tokens'))

    def list_users(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        return self.session.every_page(_path('users'), 'users', {'marker': marker}, limit)

    def show_user(self, name: str) -> dict:
        return self._one('user', 'GET', 'users', name)

    def create_user(self, name: str, password: str, role: str) -> dict:
        """:raises: NameInUse, InvalidRequest (a bad name or role, a short password)."""
        return self._one('user', 'POST', 'users',
                         json={'name': name, 'password': password, 'role': role})

    def update_user(self, name: str, password: str | None = None,
                    role: str | None = None) -> dict:
        return self._one('user', 'PATCH', 'users', name,
                         json=_given(password=password, role=role))

    def delete_user(self, name: str) -> None:
        self.session.request('DELETE', _path('users', name))

    # -- clouds and hosts -------------------------------------------------------------

    def list_clouds(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        """By name: every one (at most ``limit``), after the one named ``marker``."""
        return self.session.every_page(_path('clouds'), 'clouds', {'marker': marker}, limit)

    def show_cloud(self, name: str) -> dict:
        """:raises: CloudNotFound."""
        return self._one('cloud', 'GET', 'clouds', name)

    def create_cloud(self, name: str, connection_limit: int,
                     hosts: list[str] | None = None) -> dict:
        """:raises: InvalidRequest, NameInUse, HostNotFound."""
        return self._one('cloud', 'POST', 'clouds',
                         json={'name': name, 'connection_limit': connection_limit,
                               'hosts': list(hosts or [])})

    def update_cloud(self, name: str, connection_limit: int | None = None,
                     add_hosts: list[str] | None = None,
                     remove_hosts: list[str] | None = None) -> dict:
        """The cloud after each change, each a request of its own (a limit, then each
        host added, then each removed): unlike the dispatcher's one call, a change
        refused leaves the ones before it made.

        :raises: CloudNotFound, HostNotFound, InvalidRequest.
        """
        if connection_limit is not None:
            self._one('cloud', 'PATCH', 'clouds', name,
                      json={'connection_limit': connection_limit})
        for host in add_hosts or []:
            self.session.request('PUT', _path('clouds', name, 'hosts', host))
        for host in remove_hosts or []:
            self.session.request('DELETE', _path('clouds', name, 'hosts', host))
        return self.show_cloud(name)

    def delete_cloud(self, name: str) -> dict:
        """:returns: the cloud as it was just before. :raises: CloudNotFound, InUse."""
        cloud = self.show_cloud(name)
        self.session.request('DELETE', _path('clouds', name))
        return cloud

    def list_hosts(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        return self.session.every_page(_path('hosts'), 'hosts', {'marker': marker}, limit)

    def show_host(self, name: str) -> dict:
        """:raises: HostNotFound."""
        return self._one('host', 'GET', 'hosts', name)

    def fence_host(self, host: str) -> dict:
        """Declare ``host`` dead (see the dispatcher's): {'host', 'state', 'rebuilt',
        'failed'}. :raises: HostNotFound."""
        return self._one('fence', 'POST', 'hosts', host, 'fence')

    # -- applications -------------------------------------------------------------------

    def list_applications(self, limit: int | None = None,
                          marker: str | None = None) -> list[dict]:
        return self.session.every_page(_path('applications'), 'applications',
                                       {'marker': marker}, limit)

    def show_application(self, name: str) -> dict:
        """:raises: ApplicationNotFound."""
        return self._one('application', 'GET', 'applications', name)

    def create_application(self, name: str, image: str, port: int, protocol: str,
                           vcpus: int = 1, memory_mib: int = 256, boot: dict | None = None,
                           health: dict | None = None,
                           connection_limit: int | None = None) -> dict:
        """:raises: InvalidRequest, NameInUse, ImageNotFound."""
        return self._one('application', 'POST', 'applications', json={
            'name': name, 'image': image, 'port': port, 'protocol': protocol,
            'vcpus': vcpus, 'memory_mib': memory_mib, 'boot': boot or {}, 'health': health,
            'connection_limit': connection_limit})

    def update_application(self, name: str, changes: dict) -> dict:
        """``changes`` as the dispatcher's (a None connection_limit clears it).

        :raises: ApplicationNotFound, InvalidRequest, ImageNotFound.
        """
        return self._one('application', 'PATCH', 'applications', name, json=dict(changes))

    def delete_application(self, name: str) -> dict:
        """:returns: the application as it was just before.
        :raises: ApplicationNotFound, InUse."""
        application = self.show_application(name)
        self.session.request('DELETE', _path('applications', name))
        return application

    # -- deployments --------------------------------------------------------------------

    def deploy(self, image: str, count: int, min_count: int | None = None, vcpus: int = 1,
               memory_mib: int = 256, boot: dict | None = None,
               health: dict | None = None, cloud: str = 'default', port: int | None = None,
               protocol: str | None = None) -> dict:
        """As the dispatcher's; the caller owns it.

        :raises: ImageNotFound, NoValidHost, InvalidRequest, CloudNotFound,
            AddressPoolExhausted, ListenerPortsExhausted.
        """
        return self._deploy({'image': image, 'count': count, 'vcpus': vcpus,
                             'memory_mib': memory_mib, 'boot': boot or {}, 'cloud': cloud,
                             **_given(min_count=min_count, health=health, port=port,
                                      protocol=protocol)})

    def deploy_application(self, application: str, cloud: str, count: int,
                           min_count: int | None = None) -> dict:
        """:raises: ApplicationNotFound, CloudNotFound, NoValidHost, InvalidRequest,
            ListenerPortsExhausted."""
        return self._deploy({'application': application, 'cloud': cloud, 'count': count,
                             **_given(min_count=min_count)})

    def deploy_snapshot(self, snapshot_id: str, boot: dict | None = None,
                        allow_partial: bool = False) -> dict:
        """:raises: SnapshotNotFound; InvalidRequest (a partial snapshot, not
        ``allow_partial``)."""
        return self._deploy({'snapshot': snapshot_id, 'allow_partial': allow_partial,
                             **({'boot': boot} if boot else {})})

    def _deploy(self, body: dict) -> dict:
        return self._one('deployment', 'POST', 'deployments', json=body)

    def list_deployments(self, limit: int | None = None, marker: str | None = None,
                         cloud: str | None = None, owner: str | None = None) -> list[dict]:
        """Newest first (in ``cloud``, of ``owner``, if given)."""
        return self.session.every_page(_path('deployments'), 'deployments',
                                       {'marker': marker, 'cloud': cloud, 'owner': owner},
                                       limit)

    def show_deployment(self, deployment_id: str) -> dict:
        """With its 'instances' and 'progress'. :raises: DeploymentNotFound."""
        return self._one('deployment', 'GET', 'deployments', deployment_id)

    def delete_deployment(self, deployment_id: str) -> dict:
        """:raises: DeploymentNotFound; Forbidden (a member's, not its own)."""
        return self._one('deployment', 'DELETE', 'deployments', deployment_id)

    def wait_deployment(self, deployment_id: str, timeout: float,
                        on_poll: Callable[[dict], None] | None = None) -> dict:
        """The deployment once no instance of it is building; ``on_poll`` sees each look.

        :raises: WaitTimedOut naming the deployment if that takes over ``timeout`` s.
        """
        def poll() -> dict:
            deployment = self.show_deployment(deployment_id)
            if on_poll is not None:
                on_poll(deployment)
            return deployment
        return polling.wait(poll, lambda d: d['state'] != states.BUILDING, timeout,
                            f'deployment {deployment_id}')

    # -- snapshots ------------------------------------------------------------------------

    def snapshot(self, deployment_id: str) -> dict:
        """Snapshot every active instance at one cut; the answer waits out the cut."""
        return self._one('snapshot', 'POST', 'deployments', deployment_id, 'snapshots',
                         timeout=max(self.session.timeout, SNAPSHOT_TIMEOUT))

    def list_snapshots(self, deployment_id: str | None = None, limit: int | None = None,
                       marker: str | None = None) -> list[dict]:
        """Newest first (of one deployment, if given)."""
        return self.session.every_page(_path('snapshots'), 'snapshots',
                                       {'deployment': deployment_id, 'marker': marker},
                                       limit)

    def show_snapshot(self, snapshot_id: str) -> dict:
        """:raises: SnapshotNotFound."""
        return self._one('snapshot', 'GET', 'snapshots', snapshot_id)

    def wait_snapshot(self, snapshot_id: str, timeout: float) -> dict:
        """The snapshot once every upload ended. :raises: WaitTimedOut."""
        return polling.wait(lambda: self.show_snapshot(snapshot_id),
                            lambda s: s['state'] not in (states.FREEZING, states.UPLOADING),
                            timeout, f'snapshot {snapshot_id}')

    # -- images ---------------------------------------------------------------------------

    def list_images(self, limit: int | None = None, marker: str | None = None) -> list[dict]:
        return self.session.every_page(_path('images'), 'images', {'marker': marker}, limit)

    def show_image(self, name: str) -> dict:
        """:raises: ImageNotFound."""
        return self._one('image', 'GET', 'images', name)

    def upload_image(self, name: str, path: str, fmt: str = 'raw',
                     timeout: float = 3600.0) -> dict:
        """A new version of image ``name`` from the file at ``path`` (``fmt`` 'raw' or
        'qcow2'), streamed; ``timeout``: the seconds the API may take to answer once it
        has the bytes (it inspects and imports them first).

        :returns: the new version. :raises: UnsafeImage, InvalidRequest, ApiError (413:
            larger than the API takes); OSError if the file cannot be read.
        """
        size = os.path.getsize(path)

        def chunks() -> Iterator[bytes]:
            with open(path, 'rb') as f:
                while chunk := f.read(UPLOAD_CHUNK):
                    yield chunk
        return self._one('image', 'PUT', 'images', name, 'file', params={'format': fmt},
                         content=chunks, timeout=max(self.session.timeout, timeout),
                         headers={'Content-Type': 'application/octet-stream',
                                  'Content-Length': str(size)})

    # -- monitoring ---------------------------------------------------------------------

    def monitoring(self) -> dict:
        """The body of GET /v1/monitoring: {'sampled_at', 'clouds': [...], 'instances',
        'deployments', 'gateway'}."""
        return self.session.body('GET', _path('monitoring'))

    def connections(self, cloud: str | None = None) -> list[dict]:
        """The connections the gateway holds now (of ``cloud`` if given)."""
        return self.session.body('GET', _path('monitoring', 'connections'),
                                 params=_given(cloud=cloud))['connections']

    def events(self, limit: int = 50) -> list[dict]:
        """The dispatcher's recent events, newest first."""
        return self.session.body('GET', _path('monitoring', 'events'),
                                 params={'limit': limit})['events']

    def history(self) -> dict:
        """{'interval', 'samples': [...]}: the monitor's samples, oldest first."""
        return self.session.body('GET', _path('monitoring', 'history'))
