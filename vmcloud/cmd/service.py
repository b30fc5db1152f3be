"""``vmcloud dispatcher`` and ``vmcloud compute``: run a service until SIGTERM."""
import argparse
import logging
import signal
import threading

from oslo_config import cfg

from vmcloud.compute import manager as compute_manager
from vmcloud.dispatcher import manager as dispatcher_manager


def _run(service, stop_service) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    print('running', flush=True)
    stop.wait()
    stop_service()
    return 0


def do_dispatcher(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    dispatcher = dispatcher_manager.Dispatcher(conf)
    return _run(dispatcher, dispatcher.stop)


def do_compute(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    compute = compute_manager.ComputeManager(conf, host=args.host)
    # The instances' disks are served by this process: they cannot outlive it.
    return _run(compute, lambda: compute.stop(destroy_instances=True))


def add_parsers(groups: argparse._SubParsersAction) -> None:
    sub = groups.add_parser('dispatcher', help='run the dispatcher service')
    sub.set_defaults(handler=do_dispatcher, log=True)
    sub = groups.add_parser('compute', help='run a compute manager service on this node')
    sub.set_defaults(handler=do_compute, log=True)
    sub.add_argument('--host', help='node name (default: [DEFAULT] host)')


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format='%(asctime)s %(levelname)s %(name)s %(message)s')
