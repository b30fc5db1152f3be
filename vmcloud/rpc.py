"""oslo.messaging plumbing shared by every service: transports, clients, servers, errors.

One RPC version, no compatibility shims. Servers use the threading executor
and the explicit access policy: only methods marked with ``expose`` are
callable. Arguments and results are plain JSON-able data.
"""
import contextlib
import inspect
import socket
import threading
import warnings
from typing import Iterator

from oslo_config import cfg

with warnings.catch_warnings():
    # oslo.messaging imports oslo.service, whose eventlet backend warns on import;
    # vmcloud never uses eventlet.
    warnings.simplefilter('ignore')
    import oslo_messaging as messaging
    import oslo_messaging.opts
    from oslo_messaging.rpc import dispatcher as rpc_dispatcher

from vmcloud import exception


def expose(method):
    """Make an endpoint method callable over RPC.

    A VmcloudError it raises is an answer (an unknown image, a full cloud) that goes
    back to the caller, not a server fault to log with a traceback.
    """
    return messaging.expose(messaging.expected_exceptions(exception.VmcloudError)(method))


_transports: dict[str, messaging.Transport] = {}
_lock = threading.Lock()


def register_opts(conf: cfg.ConfigOpts) -> None:
    """oslo.messaging's own [DEFAULT] options (transport_url...), before they are read."""
    for group, opts in messaging.opts.list_opts():
        if group is None or group == 'DEFAULT':
            conf.register_opts(opts)


def transport(conf: cfg.ConfigOpts) -> messaging.Transport:
    """The process's transport for ``[DEFAULT] transport_url`` (one per URL)."""
    register_opts(conf)
    url = conf.transport_url or 'rabbit://'
    with _lock:
        if url not in _transports:
            try:
                parsed = messaging.TransportURL.parse(conf, url)
            except messaging.InvalidTransportURL as exc:
                raise exception.ConfigError(f'bad transport_url {url!r}: {exc}') from exc
            _check_reachable(parsed)
            _transports[url] = messaging.get_rpc_transport(conf, url=url)
        return _transports[url]


def _check_reachable(url: messaging.TransportURL) -> None:
    """Fail at once, by name, on a bus no one can reach.

    oslo.messaging retries a first connection forever, so a mistyped host would
    hang every command instead of failing.

    :raises: MessagingError naming the hosts and why.
    """
    if url.transport == 'fake' or not url.hosts:
        return
    problems = []
    for host in url.hosts:
        address = (host.hostname or 'localhost', host.port or 5672)
        try:
            socket.create_connection(address, timeout=5).close()
            return
        except OSError as exc:
            problems.append(f'{address[0]}:{address[1]} ({exc.strerror or exc})')
    raise exception.MessagingError(f'cannot reach the message bus at {", ".join(problems)}')


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
    return messaging.get_rpc_server(transport(conf), target, endpoints, executor='threading',
                                    access_policy=rpc_dispatcher.ExplicitRPCAccessPolicy)


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
        """:raises: the VmcloudError the remote side raised; MessagingError if none answers."""
        client = self._client.prepare(server=server, timeout=timeout or self.timeout)
        with self._errors(method, server):
            return client.call({}, method, **kwargs)

    def cast(self, method: str, server: str | None = None, **kwargs) -> None:
        """:raises: MessagingError if the message cannot be sent."""
        with self._errors(method, server):
            self._client.prepare(server=server).cast({}, method, **kwargs)

    @contextlib.contextmanager
    def _errors(self, method: str, server: str | None) -> Iterator[None]:
        who = self.service if server is None else f'{self.service} {server}'
        try:
            yield
        except messaging.RemoteError as exc:
            raise _local_error(exc) from exc
        except messaging.MessagingTimeout as exc:
            raise exception.MessagingError(
                f'the {who} did not answer {method} in time: is it running?') from exc
        except messaging.MessagingException as exc:
            raise exception.MessagingError(
                f'cannot reach the {who} for {method}: {exc}') from exc


def _local_error(remote: messaging.RemoteError) -> exception.VmcloudError:
    """The remote VmcloudError as the same class here, with the remote message."""
    cls = getattr(exception, remote.exc_type or '', None)
    if not (inspect.isclass(cls) and issubclass(cls, exception.VmcloudError)):
        return exception.VmcloudError(f'{remote.exc_type}: {remote.value}')
    error = cls.__new__(cls)
    Exception.__init__(error, remote.value)
    return error
