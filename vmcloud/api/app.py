"""The API's application (``make_app``), its services (``build_services``) and its
server (``serve``, ``ApiServer``: uvicorn, one process, ``def`` endpoints in its thread
pool since the RPC client blocks).

Around the routes, two pure ASGI middlewares (not Starlette's BaseHTTPMiddleware, which
runs the app in another task and breaks streaming bodies and context variables):

- ``RequestMiddleware``, outermost: a request id per request (``req-<uuid4>``, made
  current for the request, answered in X-OpenStack-Request-ID), the security headers on
  every answer, one access log line per request, and a 500 in the error form for an
  exception nothing else answered.
- ``BodyLimitMiddleware``: a body larger than ``[api] max_body_bytes`` (an image
  upload: ``max_image_bytes``) is refused with 413, on its Content-Length before the
  route runs, or as soon as the bytes read pass the limit.
"""
import functools
import importlib.metadata
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Callable, TypeVar

import fastapi
import uvicorn
from fastapi import responses
from fastapi import staticfiles
from fastapi.openapi import utils as openapi_utils
from oslo_config import cfg
from starlette import datastructures
from starlette import types

from vmcloud import exception
from vmcloud import rpc
from vmcloud.api import applications
from vmcloud.api import auth
from vmcloud.api import clouds
from vmcloud.api import context
from vmcloud.api import deployments
from vmcloud.api import errors
from vmcloud.api import hosts
from vmcloud.api import images
from vmcloud.api import metrics
from vmcloud.api import monitor as monitor_mod
from vmcloud.api import monitoring
from vmcloud.api import snapshots
from vmcloud.api import tokens
from vmcloud.api import users
from vmcloud.api.dashboard import views as dashboard_views
from vmcloud.db import api as db_api
from vmcloud.dispatcher import rpcapi
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)
ACCESS_LOG = logging.getLogger('vmcloud.api.access')

T = TypeVar('T')

REQUEST_ID_HEADER = 'X-OpenStack-Request-ID'
SECURITY_HEADERS = (
    ('X-Frame-Options', 'DENY'),
    ('Content-Security-Policy', "default-src 'self'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'; object-src 'none'"),
    ('X-Content-Type-Options', 'nosniff'),
    ('Referrer-Policy', 'same-origin'),
)
STATIC_PREFIX = '/dashboard/static'
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'dashboard', 'static')
# (method, path) of the routes whose body may be as large as [api] max_image_bytes.
IMAGE_UPLOADS = (('PUT', re.compile(r'/v1/images/[^/]+/file')),)
# Seconds a stopping server gives the requests it serves to finish.
GRACEFUL_SHUTDOWN = 30
# Seconds ApiServer.start waits for the server to listen.
START_TIMEOUT = 60


# -- middleware ------------------------------------------------------------------------

class BodyTooLarge(fastapi.HTTPException):
    """A body over its limit (a FastAPI HTTPException: FastAPI lets it through while it
    reads the body, instead of making it a 400)."""

    def __init__(self, limit: int, option: str):
        super().__init__(413, f'the body is larger than {limit} bytes ([api] {option})')


class RequestMiddleware:
    """Request id, security headers, access log, and the 500 of last resort."""

    def __init__(self, app: types.ASGIApp):
        self.app = app

    async def __call__(self, scope: types.Scope, receive: types.Receive,
                       send: types.Send) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        request_id = f'req-{uuid.uuid4()}'
        state = scope.setdefault('state', {})
        state['request_id'] = request_id
        path = scope.get('path', '')
        headers = _answer_headers(path, request_id)
        started = time.monotonic()
        answered: list[int] = []

        async def send_with_headers(message: types.Message) -> None:
            if message['type'] == 'http.response.start':
                answered.append(message['status'])
                message['headers'] = list(message.get('headers', ()))
                present = datastructures.MutableHeaders(scope=message)
                for name, value in headers:
                    if name not in present:
                        present[name] = value
            await send(message)

        # Current for the whole request: the lines logged in the event loop, and (kept
        # per task: see vmcloud.rpc's request ids) in the endpoint's thread and the RPC
        # messages it sends.
        with rpc.request_context(request_id):
            try:
                await self.app(scope, receive, send_with_headers)
            except Exception:
                LOG.exception('%s %s failed', scope.get('method'), path)
                if answered:
                    raise  # the answer is under way: only the connection can tell
                await errors.response(
                    request_id, 500, f'internal error of the API; its log has the '
                                     f'details, under {request_id}')(
                    scope, receive, send_with_headers)
            finally:
                user = state.get('user')
                ACCESS_LOG.info('%s %s %s %.1f ms %s client %s user %s',
                                scope.get('method'), path, answered[0] if answered else '-',
                                (time.monotonic() - started) * 1000, request_id,
                                _client(scope), user.name if user is not None else '-')


def _answer_headers(path: str, request_id: str) -> list[tuple[str, str]]:
    headers = [(REQUEST_ID_HEADER, request_id), *SECURITY_HEADERS]
    # What the API answers is for the caller alone (and current now); the dashboard's
    # scripts and styles may be cached.
    if not path.startswith(STATIC_PREFIX + '/'):
        headers.append(('Cache-Control', 'no-store'))
    return headers


def _client(scope: types.Scope) -> str:
    client = scope.get('client')
    return client[0] if client else '-'


class BodyLimitMiddleware:
    """413 for a body over its limit: see the module's docstring."""

    def __init__(self, app: types.ASGIApp, conf: cfg.ConfigOpts):
        self.app = app
        self._conf = conf

    def limit_of(self, method: str, path: str) -> tuple[int, str]:
        """The limit of a request's body in bytes, and the option that sets it."""
        if any(method == m and pattern.fullmatch(path) for m, pattern in IMAGE_UPLOADS):
            return self._conf.api.max_image_bytes, 'max_image_bytes'
        return self._conf.api.max_body_bytes, 'max_body_bytes'

    async def __call__(self, scope: types.Scope, receive: types.Receive,
                       send: types.Send) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        limit, option = self.limit_of(scope.get('method', ''), scope.get('path', ''))
        announced = datastructures.Headers(scope=scope).get('content-length')
        if announced is not None and announced.strip().isdigit() and int(announced) > limit:
            # Refused unread: nothing of it reaches the routes.
            await self._refuse(scope, receive, send, limit, option)
            return
        received = 0

        async def counted() -> types.Message:
            nonlocal received
            message = await receive()
            if message['type'] == 'http.request':
                received += len(message.get('body', b''))
                if received > limit:
                    raise BodyTooLarge(limit, option)
            return message

        answered = False

        async def watched(message: types.Message) -> None:
            nonlocal answered
            answered = answered or message['type'] == 'http.response.start'
            await send(message)
        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            # Raised where no handler answered it (another middleware reading the body).
            if answered:
                raise
            await self._refuse(scope, receive, send, limit, option)

    @staticmethod
    async def _refuse(scope: types.Scope, receive: types.Receive, send: types.Send,
                      limit: int, option: str) -> None:
        error = BodyTooLarge(limit, option)
        LOG.info('%s %s: 413: %s', scope.get('method'), scope.get('path'), error.detail)
        await errors.response(scope.get('state', {}).get('request_id', ''), 413,
                              error.detail, {'Connection': 'close'})(scope, receive, send)


# -- the application ---------------------------------------------------------------------

def _version() -> str:
    try:
        return importlib.metadata.version('vmcloud')
    except importlib.metadata.PackageNotFoundError:
        return '0'


V1 = {'id': 'v1', 'status': 'CURRENT',
      'links': [{'rel': 'self', 'href': '/v1'},
                {'rel': 'describedby', 'type': 'application/json',
                 'href': '/v1/openapi.json'}]}

_root = fastapi.APIRouter(tags=['versions'])


@_root.get('/healthz')
def healthz() -> dict:
    """Whether the API answers (no token needed; it asks nothing of the dispatcher)."""
    return {'status': 'ok'}


@_root.get('/')
def versions(user: auth.User = fastapi.Depends(auth.current_user)) -> dict:
    return {'versions': [V1]}


@_root.get('/v1')
def version(user: auth.User = fastapi.Depends(auth.current_user)) -> dict:
    """The version document of /v1."""
    return {'version': V1}


@_root.get('/v1/openapi.json', include_in_schema=False)
def openapi_document(request: fastapi.Request,
                     user: auth.User = fastapi.Depends(auth.current_user)):
    """The OpenAPI document, made from the routes themselves (for a caller with a token,
    as every route but /healthz and the login)."""
    return responses.JSONResponse(request.app.openapi())


def document(app: fastapi.FastAPI) -> dict:
    """FastAPI's OpenAPI document of ``app``, less the 401 and 403 of the routes that
    take no token (FastAPI puts the app's error answers on every route)."""
    if app.openapi_schema is None:
        schema = openapi_utils.get_openapi(
            title=app.title, version=app.version, description=app.description,
            routes=app.routes)
        for operations in schema.get('paths', {}).values():
            for operation in operations.values():
                if isinstance(operation, dict) and not operation.get('security'):
                    for status in errors.AUTHENTICATED_ONLY:
                        operation.get('responses', {}).pop(status, None)
        app.openapi_schema = schema
    return app.openapi_schema


# The modules of the /v1 resources (and /metrics), each with its ``router``.
_RESOURCES = (tokens, users, clouds, hosts, applications, deployments, snapshots, images,
              monitoring, metrics)


def make_app(services: context.Services) -> fastapi.FastAPI:
    """The API and its dashboard over ``services``."""
    app = fastapi.FastAPI(
        title='vmcloud', version=_version(),
        description='Deploy and snapshot many virtual machines at once; clouds, '
                    'applications and their connections through the gateway.',
        # Served by openapi_document, behind a token; no interactive pages (their
        # scripts come from a CDN, which the Content-Security-Policy refuses).
        openapi_url=None, docs_url=None, redoc_url=None,
        responses=errors.RESPONSES)
    app.state.services = services
    errors.install(app)
    app.include_router(_root)
    for module in _RESOURCES:
        app.include_router(module.router)
    app.include_router(dashboard_views.router)
    app.mount(STATIC_PREFIX, staticfiles.StaticFiles(directory=STATIC_DIR),
              name='dashboard-static')
    app.openapi = functools.partial(document, app)
    # The last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, conf=services.conf)
    app.add_middleware(RequestMiddleware)
    return app


def _made_once(make: Callable[[], T]) -> Callable[[], T]:
    """``make``'s result, made at the first call (by one thread), the same ever after."""
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        with lock:
            if not made:
                made.append(make())
            return made[0]
    return get


def build_services(conf: cfg.ConfigOpts) -> context.Services:
    """The real services: the dispatcher's RPC client, the Identity over the database
    (its schema upgraded), the warehouse its configuration names, the Monitor (started:
    ``close_services`` stops it).

    :raises: ConfigError, DatabaseError, MessagingError.
    """
    database = db_api.Database(conf)
    database.upgrade()
    dispatcher = rpcapi.DispatcherAPI(conf)
    monitor = monitor_mod.Monitor(conf, dispatcher)
    services = context.Services(
        conf=conf, dispatcher=dispatcher, identity=auth.Identity(conf, database),
        warehouse=_made_once(functools.partial(warehouse_mod.Warehouse, conf)),
        monitor=monitor)
    monitor.start()
    return services


def close_services(services: context.Services) -> None:
    """Stop what build_services started."""
    services.monitor.stop()


# -- the server ----------------------------------------------------------------------

class _Server(uvicorn.Server):
    """uvicorn's server, ``ready`` set once it listens; in the main thread SIGINT and
    SIGTERM stop it (uvicorn's own handling would raise the signal again once stopped,
    killing the process instead of returning)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event):
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self.ready.set()

    def handle_exit(self, sig, frame) -> None:
        self.should_exit = True


def _listening_socket(host: str, port: int) -> socket.socket:
    """:raises: ConfigError naming the address and why it cannot be listened on."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise exception.ConfigError(
            f'the API cannot listen on {host}:{port} ([api] listen_address, port): '
            f'{exc.strerror or exc}') from exc
    # asyncio sets TCP_NODELAY only on sockets made with IPPROTO_TCP, and create_server's
    # is not: with Nagle on, every answer waits out the client's delayed ACK (~40 ms) and
    # a 413 sent before closing on an unread body can be lost to the reset. Accepted
    # sockets inherit it.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _server(app: fastapi.FastAPI, ready: threading.Event) -> _Server:
    return _Server(uvicorn.Config(
        app, log_config=None, access_log=False, lifespan='off', server_header=False,
        # Not behind a proxy we know: X-Forwarded-For would let any client choose the
        # address the login throttle counts.
        proxy_headers=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN), ready)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f'http://[{host}]:{port}' if ':' in host else f'http://{host}:{port}'


def serve(conf: cfg.ConfigOpts, services: context.Services | None = None,
          ready: threading.Event | None = None) -> None:
    """Serve the API on ``[api] listen_address`` and ``port`` in this thread, until
    SIGTERM or SIGINT (in the main thread); ``ready`` is set once it listens. Services
    made here (none given) are closed when it returns.

    :raises: ConfigError (the address cannot be listened on); as build_services.
    """
    sock = _listening_socket(conf.api.listen_address, conf.api.port)
    owned = services is None
    try:
        services = services if services is not None else build_services(conf)
    except BaseException:
        sock.close()
        raise
    try:
        LOG.info('the API listens on %s', _url(sock))
        _server(make_app(services), ready or threading.Event()).run(sockets=[sock])
    finally:
        sock.close()
        if owned:
            close_services(services)


class ApiServer:
    """The API served from a thread of this process: ``start()``, ``url``, ``stop()``
    (``vmcloud api``, the demo, tests)."""

    def __init__(self, conf: cfg.ConfigOpts, services: context.Services | None = None,
                 port: int | None = None):
        """``services``: by default build_services' (closed by stop); ``port``: by
        default ``[api] port``, 0 for any free one."""
        self._conf = conf
        self._services = services
        self._owned = services is None
        self._port = conf.api.port if port is None else port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        self.app: fastapi.FastAPI | None = None

    @property
    def services(self) -> context.Services | None:
        return self._services

    def start(self) -> 'ApiServer':
        """:raises: ConfigError (the address cannot be listened on); VmcloudError if
        the server did not start; as build_services."""
        sock = _listening_socket(self._conf.api.listen_address, self._port)
        try:
            if self._services is None:
                self._services = build_services(self._conf)
            ready = threading.Event()
            self.app = make_app(self._services)
            self._server = _server(self.app, ready)
            self._thread = threading.Thread(
                target=self._server.run, kwargs={'sockets': [sock]},
                name='vmcloud-api', daemon=True)
            self._thread.start()
            deadline = time.monotonic() + START_TIMEOUT
            while not ready.wait(0.05):
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise exception.VmcloudError(
                        f'the API did not start on {_url(sock)}: see its log')
        except BaseException:
            self.stop()
            sock.close()
            raise
        self.url = _url(sock)
        LOG.info('the API listens on %s', self.url)
        return self

    def stop(self) -> None:
        """Stop serving (the requests under way get GRACEFUL_SHUTDOWN seconds)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._owned and self._services is not None:
            close_services(self._services)
            self._services = None
