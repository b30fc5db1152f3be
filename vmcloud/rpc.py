"""oslo.messaging plumbing shared by every service: transports, clients, servers, errors.

One RPC version, no compatibility shims. Servers use the threading executor
and the explicit access policy: only methods marked with ``expose`` are
callable. Arguments and results are plain JSON-able data.

Every message carries a request id in its context (``{'request_id': ...}``): the
one current in the sending thread (``request_context``), or a new one. An exposed
method runs with the id of the message it handles made current, so the log lines
it writes, and every call and cast it makes, carry the id of the request that
caused them, across services.
"""
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import math
import re
import ssl
import threading
import time
import warnings
from typing import Callable, Iterator, TypeVar

from oslo_config import cfg
from oslo_context import context as oslo_context

with warnings.catch_warnings():
    # oslo.messaging imports oslo.service, whose eventlet backend warns on import;
    # vmcloud never uses eventlet.
    warnings.simplefilter('ignore')
    import oslo_messaging as messaging
    import oslo_messaging.opts
    from oslo_messaging._drivers import common as rpc_common
    from oslo_messaging._drivers import impl_rabbit
    from oslo_messaging.rpc import dispatcher as rpc_dispatcher
from amqp import exceptions as amqp_exceptions
from kombu import exceptions as kombu_exceptions

from vmcloud import exception

T = TypeVar('T')
LOG = logging.getLogger(__name__)


# -- request ids -----------------------------------------------------------
# The current request id is oslo.context's current context, which oslo.context keeps
# in a thread-local. That is not enough for the REST API: uvicorn serves every request
# in one event loop thread, and FastAPI runs each sync dependency and each ``def``
# endpoint in whichever worker thread of its pool is free, not necessarily the same
# one. So the store is a context variable instead (swapped in once, at this module's
# import: before any service sets a context): asyncio gives each request's task its
# own copy, and FastAPI's thread pool (anyio) runs each dependency and endpoint in a
# copy of its request's, so they see their request's id. A thread started plainly has
# its own, empty one (Python 3.11 starts a thread with an empty context), and a pool
# thread keeps what it set, as with the thread-local: nothing changes for the other
# services.

_current: contextvars.ContextVar[oslo_context.RequestContext | None] = \
    contextvars.ContextVar('vmcloud_request_context', default=None)


class _TaskLocalStore:
    """Stands in for oslo.context's thread-local store, with a context variable: its one
    attribute, ``context``, read, written and deleted as the thread-local's."""

    @property
    def context(self) -> oslo_context.RequestContext | None:
        return _current.get()

    @context.setter
    def context(self, value: oslo_context.RequestContext | None) -> None:
        _current.set(value)

    @context.deleter
    def context(self) -> None:
        _current.set(None)


def _use_task_local_request_ids() -> None:
    """Swap ``_TaskLocalStore`` in for oslo.context's store; the context current in this
    thread stays current. (The store is oslo.context's private ``_request_store``:
    oslo.context offers no hook for it.)"""
    if isinstance(oslo_context._request_store, _TaskLocalStore):
        return
    current = oslo_context.get_current()
    oslo_context._request_store = _TaskLocalStore()
    if current is not None:
        current.update_store()


_use_task_local_request_ids()


def current_request_id() -> str | None:
    """The request id current in this thread, if any."""
    current = oslo_context.get_current()
    return current.request_id if current is not None else None


@contextlib.contextmanager
def request_context(request_id: str | None = None) -> Iterator[str]:
    """Make ``request_id`` (default: a new one) current in this thread (and asyncio task)
    for the block.

    oslo.log's formatter shows the current context's request id on every line,
    and every call and cast sent from the block carries it.
    """
    previous = oslo_context.get_current()
    current = oslo_context.RequestContext(request_id=request_id or None, overwrite=True)
    try:
        yield current.request_id
    finally:
        if previous is not None:
            previous.update_store()
        else:
            # oslo.context has no public way to clear the thread's context; without
            # this a worker thread would log the next, unrelated work under this id.
            oslo_context._request_store.context = None


def with_current_request(work: Callable[..., T]) -> Callable[..., T]:
    """``work`` bound to this thread's request id, for running in another thread."""
    request_id = current_request_id()

    @functools.wraps(work)
    def bound(*args, **kwargs) -> T:
        with request_context(request_id):
            return work(*args, **kwargs)
    return bound


# -- servers ---------------------------------------------------------------

class CarriedError(Exception):
    """A VmcloudError on its way to the caller: class, message and fields as JSON.

    oslo.messaging sends only an exception's class name and message to a caller
    that does not import the raising module's classes itself; this message holds
    what the caller needs to raise the same class with the same fields.
    """


def error_fields(error: exception.VmcloudError) -> dict:
    """The fields of ``error``: the ``__init__`` parameters its class keeps as attributes
    of the same name (and whose values are plain JSON data).

    When it keeps them all, ``type(error)(**fields)`` rebuilds it.
    """
    init = type(error).__init__
    if init is Exception.__init__:
        return {}
    fields = {}
    for name, parameter in inspect.signature(init).parameters.items():
        if name == 'self' or parameter.kind in (parameter.VAR_POSITIONAL,
                                                parameter.VAR_KEYWORD):
            continue
        if hasattr(error, name):
            value = getattr(error, name)
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                continue
            fields[name] = value
    return fields


def expose(method):
    """Make an endpoint method callable over RPC.

    Called over RPC, it runs with the request id of the message made current, and a
    VmcloudError it raises is an answer (an unknown image, a full cloud) that goes
    back to the caller as the same class with the same fields, not a server fault
    to log with a traceback. Called directly, it is the plain method.
    """
    return messaging.expose(method)


def _at_the_boundary(method: Callable) -> Callable:
    """``method`` (bound, exposed) as the RPC dispatcher should call it."""
    def handle(ctxt: dict, **kwargs):
        with request_context((ctxt or {}).get('request_id')):
            try:
                return method(ctxt, **kwargs)
            except exception.VmcloudError as exc:
                raise CarriedError(json.dumps({
                    'class': type(exc).__name__, 'message': str(exc),
                    'fields': error_fields(exc)})) from exc
    handling = messaging.expected_exceptions(CarriedError)(handle)
    return messaging.expose(functools.update_wrapper(handling, method))


class _Endpoint:
    """What the RPC dispatcher sees of an endpoint: its exposed methods, each behind
    ``_at_the_boundary``; everything else as it is (the access policy refuses it)."""

    def __init__(self, endpoint):
        self._endpoint = endpoint

    def __getattr__(self, name: str):
        value = getattr(self._endpoint, name)
        if callable(value) and getattr(value, 'exposed', False):
            return _at_the_boundary(value)
        return value


_transports: dict[str, messaging.Transport] = {}
_lock = threading.Lock()

# How long to wait before the next attempt at an unreachable bus: doubling, so a bus
# that is starting is found soon and one that is down is not hammered.
_FIRST_PAUSE = 1.0
_LONGEST_PAUSE = 10.0


def register_opts(conf: cfg.ConfigOpts) -> None:
    """oslo.messaging's own [DEFAULT] options (transport_url...), before they are read."""
    for group, opts in messaging.opts.list_opts():
        if group is None or group == 'DEFAULT':
            conf.register_opts(opts)


def masked_url(url: str) -> str:
    """``url`` with every host's password replaced by ``***``, for errors and logs.

    Credentials are what comes before a host's last ``@`` (hosts are separated by
    ``,``), the password what follows the user's first ``:``, as TransportURL.parse
    reads them; a plain text substitution, so that a URL too malformed to parse can
    still be named in the error that says so.
    """
    return _CREDENTIALS.sub(r'\1:***@', url)


_CREDENTIALS = re.compile(r'([^/,@:]*):[^/,]*@')


def transport(conf: cfg.ConfigOpts) -> messaging.Transport:
    """The process's transport for ``[DEFAULT] transport_url`` (one per URL).

    The first time, one real connection checks the bus, tried ``[DEFAULT]
    rpc_connect_retries`` more times while no host answers: oslo.messaging itself
    retries a first connection forever, and a refused login surfaces as a traceback
    from wherever the first message is sent.

    :raises: ConfigError (a malformed URL), MessageBusRefused, MessageBusUnreachable,
        each naming the URL with its passwords masked.
    """
    register_opts(conf)
    # Quiet: the CLI prints its one line of error, and a client's retries are few.
    return _open(conf, logging.DEBUG, attempts=conf.rpc_connect_retries + 1, timeout=None)


def wait_for_bus(conf: cfg.ConfigOpts) -> messaging.Transport:
    """The transport, for a service that is starting (see ``transport``).

    The bus may come up after the service (hosts booting together), so an
    unreachable one is tried again, with a warning naming it before each pause,
    for up to ``[DEFAULT] rpc_startup_timeout`` seconds. A refused login or a
    malformed URL fails at once: no number of retries changes them.

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable (after the timeout).
    """
    register_opts(conf)
    return _open(conf, logging.WARNING, attempts=None, timeout=conf.rpc_startup_timeout)


def _open(conf: cfg.ConfigOpts, level: int, attempts: int | None,
          timeout: float | None) -> messaging.Transport:
    """:param level: of the log line before each pause on an unreachable bus."""
    url = conf.transport_url or 'rabbit://'
    shown = masked_url(url)
    with _lock:
        if url in _transports:
            return _transports[url]
        parsed = _parse(conf, url, shown)
        try:
            opened = messaging.get_rpc_transport(conf, url=parsed)
        except messaging.DriverLoadFailure as exc:
            raise exception.ConfigError(
                f'bad transport_url {shown}: no messaging driver {parsed.transport!r}') \
                from exc
        try:
            if parsed.transport == 'rabbit':
                # fake:// is in-process: nothing to reach.
                _until_reachable(conf, parsed, shown, level, attempts, timeout)
        except BaseException:
            opened.cleanup()
            raise
        _transports[url] = opened
        return opened


def _parse(conf: cfg.ConfigOpts, url: str, shown: str) -> messaging.TransportURL:
    """:raises: ConfigError naming ``shown`` and what is wrong with it."""
    try:
        parsed = messaging.TransportURL.parse(conf, url)
    except (messaging.InvalidTransportURL, ValueError) as exc:
        # A port that is not a number or a broken IPv6 address is a ValueError; the
        # InvalidTransportURL's text is its reason alone.
        raise exception.ConfigError(f'bad transport_url {shown}: {exc}') from exc
    for host in parsed.hosts:
        if host.port is not None and not 0 < host.port < 65536:
            raise exception.ConfigError(
                f'bad transport_url {shown}: port {host.port} is not between 1 and 65535')
    return parsed


def _until_reachable(conf: cfg.ConfigOpts, parsed: messaging.TransportURL, shown: str,
                     level: int, attempts: int | None, timeout: float | None) -> None:
    """Try the bus until a host takes the login, ``attempts`` times or for ``timeout`` s.

    :raises: MessageBusRefused at once; MessageBusUnreachable when out of tries.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _FIRST_PAUSE
    tried = 0
    while True:
        try:
            return _connect_once(conf, parsed, shown)
        except exception.MessageBusUnreachable as exc:
            tried += 1
            left = math.inf if deadline is None else deadline - time.monotonic()
            if (attempts is not None and tried >= attempts) or left <= 0:
                raise
            problem = str(exc)
        pause = min(pause, left)
        # Out of the except block: oslo.log would append the exception to the line.
        LOG.log(level, '%s; trying again in %.0f s', problem, pause)
        time.sleep(pause)
        pause = min(pause * 2, _LONGEST_PAUSE)


def _connect_once(conf: cfg.ConfigOpts, parsed: messaging.TransportURL, shown: str) -> None:
    """Connect to each host of the bus in turn until one takes the login, and close.

    Through the rabbit driver's own Connection, not a bare kombu one: the check then
    sees what the transport will (its TLS options, login method, URL defaults).

    :raises: MessageBusRefused (login, virtual host, TLS), MessageBusUnreachable.
    """
    hosts = parsed.hosts or [None]
    if not parsed.hosts:
        # The driver's default: say where that is, 'rabbit://' alone does not.
        shown = f'{shown} (guest@localhost:5672)'
    problems = []
    for host in hosts:
        one = parsed if host is None else messaging.TransportURL(
            conf, parsed.transport, parsed.virtual_host, [host], parsed.query)
        try:
            impl_rabbit.Connection(conf, one, rpc_common.PURPOSE_LISTEN, retry=0).close()
            return
        except Exception as exc:  # kombu's and amqp's errors have no common root
            problem = classify_connect_error(exc, shown)
            if isinstance(problem, exception.MessageBusRefused):
                raise problem from exc
            where = '' if host is None or len(hosts) == 1 else \
                f'{host.hostname}:{host.port or 5672}: '
            problems.append((where + str(problem.args[0]), exc))
    raise exception.MessageBusUnreachable(
        f'cannot reach the message bus at {shown}: '
        f'{"; ".join(text for text, _ in problems)}') from problems[-1][1]


def classify_connect_error(exc: Exception, shown: str) -> exception.MessagingError:
    """What a failed connection to RabbitMQ at ``shown`` means.

    amqp raises AccessRefused for a wrong user or password and NotAllowed for an
    unknown or forbidden virtual host; kombu wraps a socket's failure (refused,
    unresolvable, timed out, a TLS handshake) in OperationalError, the OSError its cause.

    :returns: MessageBusRefused when retrying cannot help, else MessageBusUnreachable
        holding only the reason (the caller names the URL).
    """
    if isinstance(exc, amqp_exceptions.AccessRefused):
        return exception.MessageBusRefused(
            f'RabbitMQ at {shown} refused the login ({exc.reply_text})')
    if isinstance(exc, amqp_exceptions.NotAllowed):
        return exception.MessageBusRefused(
            f'RabbitMQ at {shown} refused the connection ({exc.reply_text})')
    cause = exc.__cause__ if isinstance(exc, kombu_exceptions.OperationalError) else exc
    if isinstance(cause, ssl.SSLError):
        return exception.MessageBusRefused(
            f'the TLS handshake with RabbitMQ at {shown} failed: '
            f'{getattr(cause, "reason", None) or cause.strerror or cause}')
    if isinstance(cause, OSError):
        return exception.MessageBusUnreachable(cause.strerror or str(cause))
    # The broker closing the connection while it starts or stops (ConnectionForced...).
    return exception.MessageBusUnreachable(str(exc) or type(exc).__name__)


def cleanup() -> None:
    """Close every transport this process opened (their connections and threads)."""
    with _lock:
        transports = list(_transports.values())
        _transports.clear()
    for each in transports:
        each.cleanup()


def notifier(conf: cfg.ConfigOpts, publisher: str) -> messaging.Notifier:
    """Notifications go where ``[oslo_messaging_notifications]`` says (nowhere by default)."""
    return messaging.Notifier(messaging.get_notification_transport(conf),
                              publisher_id=publisher)


def server(conf: cfg.ConfigOpts, topic: str, name: str, endpoints: list):
    target = messaging.Target(topic=topic, server=name)
    return messaging.get_rpc_server(transport(conf), target,
                                    [_Endpoint(each) for each in endpoints],
                                    executor='threading',
                                    access_policy=rpc_dispatcher.ExplicitRPCAccessPolicy)


def call_until_answered(work: Callable[[], T], who: str, timeout: float,
                        stopping: threading.Event, longest_pause: float = 10.0) -> T:
    """``work()`` (a service's first call to the dispatcher: its registration), again
    after each MessagingError, pausing 1 s, then twice as long each time up to
    ``longest_pause``, for ``timeout`` s in all: services may start before the dispatcher.

    :raises: MessagingError naming ``who`` once ``timeout`` s have passed (its cause the
        last error), or when ``stopping`` is set meanwhile; any other error of ``work``.
    """
    deadline = time.monotonic() + timeout
    pause = 1.0
    while True:
        try:
            return work()
        except exception.MessagingError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise exception.MessagingError(
                    f'{who} could not register with the dispatcher within {timeout} s: '
                    f'{exc}') from exc
            problem = str(exc)
        LOG.warning('%s; registering %s again in %.0f s', problem, who, min(pause, left))
        if stopping.wait(min(pause, left)):
            raise exception.MessagingError(f'{who} stopped while registering')
        pause = min(pause * 2, longest_pause)


class Client:
    """Calls one service's topic; errors come back as vmcloud errors."""

    def __init__(self, conf: cfg.ConfigOpts, topic: str, service: str,
                 retry: int | None = None):
        """``retry``: connection attempts before giving up; None: [DEFAULT]
        rpc_connect_retries; -1: forever (a service's own reports)."""
        self.service = service
        self.timeout = conf.rpc_call_timeout
        self._client = messaging.get_rpc_client(
            transport(conf), messaging.Target(topic=topic), timeout=self.timeout,
            retry=conf.rpc_connect_retries if retry is None else retry)

    def call(self, method: str, server: str | None = None, timeout: float | None = None,
             **kwargs):
        """:raises: the VmcloudError the remote side raised (same class, same fields);
            MessagingError if none answers or it does not offer ``method``."""
        client = self._client.prepare(server=server, timeout=timeout or self.timeout)
        with self._errors(method, server):
            return client.call(_context(), method, **kwargs)

    def cast(self, method: str, server: str | None = None, fanout: bool = False,
             **kwargs) -> None:
        """``fanout``: every server of the topic gets it.

        :raises: MessagingError if the message cannot be sent.
        """
        with self._errors(method, server):
            self._client.prepare(server=server, fanout=fanout).cast(_context(), method, **kwargs)

    @contextlib.contextmanager
    def _errors(self, method: str, server: str | None) -> Iterator[None]:
        who = self.service if server is None else f'{self.service} {server}'
        try:
            yield
        except messaging.RemoteError as exc:
            if exc.exc_type == rpc_dispatcher.NoSuchMethod.__name__:
                raise exception.MessagingError(f'the {who} does not offer {method}') from exc
            raise local_error(exc.exc_type, exc.value) from exc
        # The fake:// transport raises the server's own exception in the caller.
        except CarriedError as exc:
            raise local_error(CarriedError.__name__, str(exc)) from exc
        except rpc_dispatcher.NoSuchMethod as exc:
            raise exception.MessagingError(f'the {who} does not offer {method}') from exc
        except messaging.MessagingTimeout as exc:
            raise exception.MessagingError(
                f'the {who} did not answer {method} in time: is it running?') from exc
        except messaging.MessagingException as exc:
            raise exception.MessagingError(
                f'cannot reach the {who} for {method}: {exc}') from exc
        except exception.VmcloudError:
            raise
        except Exception as exc:
            # A bug on the remote side. fake:// raises the server's own exception here;
            # RabbitMQ rebuilds a builtin one (KeyError...) with the server's traceback
            # appended to its message: that belongs in the server's log, not in an error.
            raise exception.VmcloudError(f'{type(exc).__name__}: {_remote_message(exc)}') \
                from exc


# How oslo.messaging's deserialize_remote_exception appends the remote traceback.
_REMOTE_TRACEBACK = '\nTraceback (most recent call last):'


def _remote_message(exc: Exception) -> str:
    """``exc``'s message, without the remote traceback oslo.messaging may have added."""
    message = exc.args[0] if len(exc.args) == 1 else None
    if isinstance(message, str) and _REMOTE_TRACEBACK in message:
        return message.split(_REMOTE_TRACEBACK, 1)[0]
    return str(exc)


def _context() -> dict:
    return {'request_id': current_request_id() or oslo_context.generate_request_id()}


def local_error(exc_type: str | None, value: str | None) -> exception.VmcloudError:
    """The remote VmcloudError as the same class here, with its fields and message.

    Anything else the remote side raised (a bug there) is a VmcloudError naming it.
    """
    carried = None
    if exc_type == CarriedError.__name__:
        try:
            carried = json.loads(value or '')
        except (TypeError, ValueError):
            pass
    if not isinstance(carried, dict):
        return exception.VmcloudError(f'{exc_type}: {value}')
    fields = carried.get('fields')
    return rebuilt_error(str(carried.get('class') or ''), str(carried.get('message', '')),
                         fields if isinstance(fields, dict) else {})


def error_class(class_name: str) -> type[exception.VmcloudError] | None:
    """The VmcloudError class of vmcloud.exception named ``class_name``, if there is one
    (only those: a name received is never looked up anywhere else)."""
    cls = getattr(exception, class_name, None) if class_name else None
    if inspect.isclass(cls) and issubclass(cls, exception.VmcloudError):
        return cls
    return None


def rebuilt_error(class_name: str, message: str, fields: dict) -> exception.VmcloudError:
    """The VmcloudError of class ``class_name`` (looked up in vmcloud.exception), with
    ``fields`` (as ``error_fields`` gave them) and ``message``: how an error that crossed
    a boundary as its class name, message and fields (an RPC answer, an API error body)
    is raised again on this side.

    A name of no such class gives a VmcloudError naming it.
    """
    cls = error_class(class_name)
    if cls is None:
        return exception.VmcloudError(f'{class_name}: {message}')
    if fields:
        try:
            error = cls(**fields)
        except (TypeError, ValueError):
            error = None
        if error is not None and str(error) == message:
            return error
    # A class that takes only a message, or keeps only some of its parameters, or whose
    # message here would differ: the remote message, with the fields it sent.
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    for name, value in fields.items():
        setattr(error, name, value)
    return error
