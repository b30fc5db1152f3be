"""NBD disk URIs as qemu and libvirt take them."""
import dataclasses
import os
import socket
import urllib.parse

from vmcloud import exception

DEFAULT_PORT = 10809


@dataclasses.dataclass(frozen=True)
class NbdUri:
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None


def is_nbd(disk: str) -> bool:
    return disk.startswith(('nbd://', 'nbd+unix://', 'nbd+tcp://'))


def parse(disk: str) -> NbdUri:
    """:raises: DiskNotFound if the URI is malformed."""
    uri = urllib.parse.urlsplit(disk)
    export = uri.path.lstrip('/')
    if uri.scheme == 'nbd+unix':
        path = urllib.parse.parse_qs(uri.query).get('socket', [None])[0]
        if not path:
            raise exception.DiskNotFound(f'NBD URI {disk} names no socket')
        return NbdUri(export=export, socket=path)
    if not uri.hostname:
        raise exception.DiskNotFound(f'NBD URI {disk} names no host')
    return NbdUri(export=export, host=uri.hostname, port=uri.port or DEFAULT_PORT)


def check_reachable(disk: str) -> None:
    """:raises: DiskNotFound for a missing socket or a host name that does not resolve."""
    uri = parse(disk)
    if uri.socket is not None:
        if not os.path.exists(uri.socket):
            raise exception.DiskNotFound(f'NBD socket {uri.socket} does not exist')
        return
    try:
        socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise exception.DiskNotFound(f'unknown NBD host {uri.host}: {exc.strerror}') from exc
