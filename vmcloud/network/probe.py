"""Health probes from the host's side of a guest network: from its DHCP namespace, the
one place on the host with an address in the network.

Each probe runs in a short-lived thread that setns()es into the namespace (network
namespaces are per thread), so the calling thread, and the process, stay where they are.
"""
import ctypes
import http.client
import os
import socket
import threading
from typing import Callable, TypeVar

from vmcloud import exception

CLONE_NEWNET = 0x40000000
# The thread is given this much more than the probe's own timeout before it is given up.
_GRACE = 2.0

T = TypeVar('T')
_libc = ctypes.CDLL(None, use_errno=True)


def _in_namespace(namespace: str, what: str, timeout: float, fn: Callable[[], T]) -> T:
    result: dict = {}

    def target():
        try:
            fd = os.open(f'/run/netns/{namespace}', os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            result['error'] = exception.NetworkError(
                f'{what}: no namespace {namespace}: {exc.strerror}')
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                result['error'] = exception.NetworkError(
                    f'{what}: cannot enter namespace {namespace}: {os.strerror(code)}')
                return
        finally:
            os.close(fd)
        try:
            result['value'] = fn()
        except socket.timeout as exc:
            result['error'] = _error(what, namespace, f'timed out after {timeout:g} s', exc)
        except (OSError, http.client.HTTPException) as exc:
            reason = (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno
                      else str(exc) or type(exc).__name__)
            result['error'] = _error(what, namespace, reason, exc)

    thread = threading.Thread(target=target, name=f'probe {namespace}', daemon=True)
    thread.start()
    thread.join(timeout + _GRACE)
    if thread.is_alive():
        raise exception.NetworkError(f'{what} from namespace {namespace}: no answer in '
                                     f'{timeout + _GRACE:g} s')
    if 'error' in result:
        raise result['error']
    return result['value']


def _error(what: str, namespace: str, reason: str, cause: Exception) -> exception.NetworkError:
    error = exception.NetworkError(f'{what} from namespace {namespace}: {reason}')
    error.__cause__ = cause
    return error


def tcp_connect(namespace: str, address: str, port: int, timeout: float) -> None:
    """Open (and close) a TCP connection to ``address:port`` from ``namespace``.

    :raises: NetworkError (unreachable, refused, timed out), naming address, port and
        namespace.
    """
    def connect():
        socket.create_connection((address, int(port)), timeout=timeout).close()

    _in_namespace(namespace, f'TCP connection to {address}:{port}', timeout, connect)


def http_get(namespace: str, address: str, port: int, path: str, timeout: float
             ) -> tuple[int, bytes]:
    """GET ``http://address:port/path`` from ``namespace``.

    :returns: the status and the body (at most 64 KiB of it).
    :raises: NetworkError (unreachable, refused, timed out, not HTTP), naming address,
        port and namespace.
    """
    def get():
        connection = http.client.HTTPConnection(address, int(port), timeout=timeout)
        try:
            connection.request('GET', path or '/', headers={'Connection': 'close'})
            response = connection.getresponse()
            return response.status, response.read(64 * 1024)
        finally:
            connection.close()

    return _in_namespace(namespace, f'HTTP GET http://{address}:{port}{path or "/"}',
                         timeout, get)
