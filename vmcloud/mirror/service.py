"""The node's mirror service: the mirrors and their NBD server in a process of their own.

A compute manager that stops, restarts or is upgraded must not take its guests' disks
with it, so the mirrors live here and the manager asks for them over the control
socket ([mirror] control_socket) with ``api.RemoteMirrors``. At start the service
serves again every mirror it finds under [mirror] mirrors_path, with every write they
had flushed, so a guest whose service was restarted reconnects to the same disk.

One service per node: the control socket is owned like the NBD socket (a StateLock on
``SOCKET.lock``, taken before anything else), so a second service is refused naming
the first, and never removes the first one's socket.

Protocol: see ``vmcloud.mirror.api``. One thread per connection, at most
``MAX_CONNECTIONS`` at a time; a request line is at most ``api.MAX_REQUEST_BYTES``.
"""
import dataclasses
import inspect
import json
import logging
import os
import shutil
import socket
import threading
from typing import Any, Callable

from oslo_config import cfg

from vmcloud import exception
from vmcloud.mirror import api
from vmcloud.nbd import statelock
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
# A connection that sends no request for this long is closed (clients connect per call).
IDLE_TIMEOUT = 60.0
# How long stop() waits for the requests being handled before it closes the mirrors.
STOP_GRACE = 10.0


def _ping(mirrors: api.LocalMirrors) -> dict:
    return {'pid': os.getpid(), 'mirrors': len(mirrors.names())}


# method -> what runs it (its keyword arguments are the request's args) and the answer
METHODS: dict[str, Callable[..., Any]] = {
    'ping': _ping,
    'create': lambda mirrors, name, image: dataclasses.asdict(mirrors.create(name, image)),
    'names': lambda mirrors: mirrors.names(),
    'remove': lambda mirrors, name: mirrors.remove(name),
    'set_phase': lambda mirrors, name, phase: mirrors.set_phase(name, phase),
    'needed_bytes': lambda mirrors, name: mirrors.needed_bytes(name),
    'fetched_bytes': lambda mirrors: mirrors.fetched_bytes(),
    'cached_bytes': lambda mirrors: mirrors.cached_bytes(),
    'sync': lambda mirrors, name: mirrors.sync(name),
    'barrier': lambda mirrors, key, names: mirrors.barrier(key, names),
    'upload': lambda mirrors, key, targets: mirrors.upload(key, targets),
    'discard': lambda mirrors, key: mirrors.discard(key),
    'wait_persistent': lambda mirrors, key, seconds: mirrors.wait_persistent(key, seconds),
    'peer_url': lambda mirrors: mirrors.peer_url(),
    'set_peers': lambda mirrors, me, peers: mirrors.set_peers(me, peers),
    'peer_stats': lambda mirrors: mirrors.peer_stats(),
}


class MirrorService:
    def __init__(self, conf: cfg.ConfigOpts, warehouse: warehouse_mod.Warehouse | None = None):
        """Own the node's control socket, chunk cache and NBD socket, serve every mirror
        found on disk, and listen (accepting once start() is called).

        A mirror that cannot be opened (a corrupt dirty map, its image gone) is logged
        by name and left on disk as it is, for the operator; a directory without its
        meta.json (a create cut short) is removed.

        :raises: StateLocked naming the owner if another service (or a ``vmcloud
            mirror serve``) has the node's state; MirrorError if the control socket
            cannot be created; as MirrorManager.
        """
        self.path = conf.mirror.control_socket
        os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
        self._owner = statelock.StateLock('mirror service control socket', f'{self.path}.lock')
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._guard = threading.Lock()
        self._accepter: threading.Thread | None = None
        self.mirrors: api.LocalMirrors | None = None
        self._listener: socket.socket | None = None
        try:
            self.mirrors = api.LocalMirrors(conf, warehouse)
            self._open_all()
            self._listener = self._listen()
        except BaseException:
            self._give_up()
            raise

    def _open_all(self) -> None:
        path = self.mirrors.mirrors_path
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            if not os.path.isdir(os.path.join(path, name)):
                continue
            try:
                self.mirrors.open(name)
            except exception.MirrorNotFound:
                # Its create was cut short before its meta.json, the first thing written:
                # nothing of a guest is in it, and left there it would refuse every new
                # mirror of that name (MirrorExists) and never be removed.
                LOG.warning('removing %s: a mirror whose creation was cut short',
                            os.path.join(path, name))
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            except (exception.VmcloudError, OSError) as exc:
                LOG.error('mirror %s in %s is not served: %s', name, path, exc)
            else:
                LOG.info('mirror %s served again', name)

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Ours: we hold its lock, so whatever is there was left by a dead owner.
            if os.path.lexists(self.path):
                os.unlink(self.path)
            old_mask = os.umask(0o177)  # the socket is created 0600: its user only
            try:
                listener.bind(self.path)
            finally:
                os.umask(old_mask)
            listener.listen(MAX_CONNECTIONS)
        except OSError as exc:
            listener.close()
            raise exception.MirrorError(
                f'cannot listen on the mirror service socket {self.path}: {exc}') from exc
        return listener

    def start(self) -> 'MirrorService':
        self._accepter = threading.Thread(target=self._accept, daemon=True,
                                          name='mirror-service-accept')
        self._accepter.start()
        LOG.info('mirror service listening on %s, serving %d mirrors over NBD at %s',
                 self.path, len(self.mirrors.names()), self.mirrors.socket)
        return self

    def _accept(self) -> None:
        listener = self._listener  # stop() clears the attribute
        while not self._stopping.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                LOG.exception('mirror service: accept failed')
                self._stopping.wait(0.1)  # a transient EMFILE must not spin
                continue
            with self._guard:
                full = len(self._connections) >= MAX_CONNECTIONS
                if not full:
                    self._connections.add(connection)
                    handler = threading.Thread(target=self._handle, args=(connection,),
                                               daemon=True, name='mirror-service-request')
                    self._handlers.add(handler)
                    handler.start()  # under the guard: stop() joins only started threads
            if full:
                self._refuse(connection)

    @staticmethod
    def _refuse(connection: socket.socket) -> None:
        try:
            connection.settimeout(1.0)
            connection.sendall(api.encode(api.error_message(exception.MirrorServiceUnavailable(
                'this socket', f'over {MAX_CONNECTIONS} connections at once; try again'))))
        except OSError:
            pass
        connection.close()

    def _handle(self, connection: socket.socket) -> None:
        try:
            connection.settimeout(IDLE_TIMEOUT)
            with connection.makefile('rb') as lines:
                while not self._stopping.is_set():
                    line = lines.readline(api.MAX_REQUEST_BYTES + 1)
                    if not line:
                        return
                    if not line.endswith(b'\n'):
                        # Too long (or cut short): nothing after it can be framed again.
                        self._answer(connection, api.error_message(exception.MirrorRequestInvalid(
                            f'request over {api.MAX_REQUEST_BYTES} bytes or without its '
                            'newline')))
                        return
                    self._answer(connection, self.handle_line(line))
        except OSError as exc:
            if not self._stopping.is_set():
                LOG.info('mirror service: a client connection ended: %s', exc)
        finally:
            connection.close()
            with self._guard:
                self._connections.discard(connection)
                self._handlers.discard(threading.current_thread())

    @staticmethod
    def _answer(connection: socket.socket, message: dict) -> None:
        connection.sendall(api.encode(message))

    def handle_line(self, line: bytes) -> dict:
        """The answer to one request line: ``{'result': ...}`` or ``{'error': ...}``."""
        try:
            return {'result': self._run(*self._parse(line))}
        except exception.VmcloudError as exc:
            return api.error_message(exc)
        except OSError as exc:
            # A local fault (a full disk, EIO) answered by name; the service goes on.
            return api.error_message(exception.MirrorError(f'mirror service: {exc}'))
        except Exception as exc:  # a bug: logged with its traceback, answered by name
            LOG.exception('mirror service: request failed')
            return api.error_message(exception.VmcloudError(f'{type(exc).__name__}: {exc}'))

    @staticmethod
    def _parse(line: bytes) -> tuple[str, Callable[..., Any], dict]:
        """:raises: MirrorRequestInvalid naming what is wrong with the request."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            raise exception.MirrorRequestInvalid(
                f'request is not JSON: {line[:100]!r}: {exc}') from exc
        if not isinstance(request, dict) or not isinstance(request.get('method'), str):
            raise exception.MirrorRequestInvalid(
                f'request is not an object with a "method" string: {line[:100]!r}')
        method, args = request['method'], request.get('args', {})
        run = METHODS.get(method)
        if run is None:
            raise exception.MirrorRequestInvalid(
                f'unknown method {method!r}; the mirror service offers {", ".join(METHODS)}')
        if not isinstance(args, dict):
            raise exception.MirrorRequestInvalid(f'{method}: "args" is not an object')
        try:
            inspect.signature(run).bind(None, **args)
        except TypeError as exc:
            raise exception.MirrorRequestInvalid(f'{method}: bad arguments: {exc}') from exc
        return method, run, args

    def _run(self, method: str, run: Callable[..., Any], args: dict) -> Any:
        LOG.debug('mirror service: %s %s', method, args)
        return run(self.mirrors, **args)

    def stop(self) -> None:
        """Stop taking requests, then close the mirrors (each keeps its state, served again
        by the next start) and give the node's state up, the control socket's lock last.

        :raises: as LocalMirrors.close, once everything is given up.
        """
        self._stopping.set()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                os.unlink(self.path)  # first: a new client finds no socket, not a dead one
            except FileNotFoundError:
                pass
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept(); close() alone may not
            except OSError:
                pass
            listener.close()
        with self._guard:
            connections, handlers = list(self._connections), list(self._handlers)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RD)  # idle readers wake; answers still go out
            except OSError:
                pass
        for handler in handlers:
            handler.join(STOP_GRACE / max(1, len(handlers)))
        if self._accepter is not None:
            self._accepter.join(STOP_GRACE)
        self._give_up()

    def _give_up(self) -> None:
        try:
            if self.mirrors is not None:
                mirrors, self.mirrors = self.mirrors, None
                mirrors.close()
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._owner.release()

    def __enter__(self) -> 'MirrorService':
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
