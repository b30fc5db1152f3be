"""``vmcloud warehouse``: serve the warehouse over HTTP until SIGTERM.

Configured like the other services: ``[warehouse_service]`` (address, port,
token, TLS) and the store it serves, ``[storage] backend`` with that backend's
own group. Prints the URL it serves on once it listens.
"""
import argparse
import signal
import threading

from oslo_config import cfg
from oslo_log import log

from vmcloud.storage.service import server as server_mod


def do_warehouse(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: ConfigError (no token, half a TLS pair), StorageError (cannot listen)."""
    log.setup(conf, 'vmcloud')
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = server_mod.WarehouseServer(conf)
    url = service.start()
    try:
        print(f'serving the warehouse on {url}', flush=True)
        stop.wait()
    finally:
        service.stop()
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    sub = groups.add_parser('warehouse',
                            help='serve the warehouse over HTTP')
    sub.set_defaults(handler=do_warehouse, log=True)
