"""Functional tests of the gateway: HAProxy for real, on loopback."""
import itertools
import os
import socket

_blocks = itertools.count()
# Above the gateway's default listener ranges (21000-22999), which other tests use.
FIRST_PORT = 23000


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive loopback ports nobody binds now, in a block
    derived from this process's pid (tests of two workers run at once). The blocks lie
    between the gateway's default ranges and the kernel's ephemeral ports: a client's
    connection would take an ephemeral port between this check and HAProxy's bind."""
    with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
        ephemeral_low = int(f.read().split()[0])
    blocks = (ephemeral_low - FIRST_PORT) // size
    for attempt in range(blocks):
        low = FIRST_PORT + ((os.getpid() * 7 + next(_blocks) + attempt) % blocks) * size
        sockets = []
        try:
            for port in range(low, low + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(('127.0.0.1', port))
            return low
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f'no {size} free consecutive ports below {ephemeral_low}')
