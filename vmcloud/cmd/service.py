"""``vmcloud dispatcher`` and ``vmcloud compute``: run a service until SIGTERM.

Services log through oslo.log (``[DEFAULT] debug``, ``log_file``, ``log_dir``,
``use_journal``...): each line written while handling a request shows that
request's id, the same in the dispatcher's and the compute managers' logs.
"""
import argparse
import signal
import threading

from oslo_config import cfg
from oslo_log import log

import vmcloud.conf
from vmcloud import rpc
from vmcloud.compute import manager as compute_manager
from vmcloud.dispatcher import manager as dispatcher_manager
from vmcloud.drivers import base as driver_base
from vmcloud.mirror import api as mirror_api

# oslo.log's defaults show five fields of identity an OpenStack context has; vmcloud's
# requests have only their id.
CONTEXT_FORMAT = ('%(asctime)s.%(msecs)03d %(process)d %(levelname)s %(name)s '
                  '[%(request_id)s] %(message)s')


def run(service, stop_service) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service.start()
    print('running', flush=True)
    stop.wait()
    stop_service()
    return 0


def do_dispatcher(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: ConfigError, MessageBusRefused, MessageBusUnreachable (see rpc.wait_for_bus)."""
    log.setup(conf, 'vmcloud')
    rpc.wait_for_bus(conf)
    dispatcher = dispatcher_manager.Dispatcher(conf)
    return run(dispatcher, dispatcher.stop)


def do_compute(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """The node's guests keep running when this stops: their disks are the node's
    mirror service's, which this waits for ([DEFAULT] rpc_startup_timeout).

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable (see rpc.wait_for_bus);
        MirrorServiceUnavailable; HostNameInUse naming the node that holds the host name.
    """
    log.setup(conf, 'vmcloud')
    # Before any wait: a driver that cannot be loaded is a configuration error to say now.
    driver = driver_base.load(conf)
    rpc.wait_for_bus(conf)
    mirrors = mirror_api.RemoteMirrors(conf)
    mirrors.wait(conf.rpc_startup_timeout)
    try:
        compute = compute_manager.ComputeManager(conf, mirrors, host=args.host, driver=driver)
        return run(compute, compute.stop)
    finally:
        mirrors.close()


def add_parsers(groups: argparse._SubParsersAction) -> None:
    sub = groups.add_parser('dispatcher', help='run the dispatcher service')
    sub.set_defaults(handler=do_dispatcher, log=True)
    sub = groups.add_parser('compute', help='run a compute manager service on this node')
    sub.set_defaults(handler=do_compute, log=True)
    sub.add_argument('--host', help='node name (default: [DEFAULT] host)')


def setup_logging(conf: cfg.ConfigOpts | None = None) -> None:
    """Register oslo.log's options, before the configuration is read (the CLI calls
    this for the services); the service's handler then sets logging up from them."""
    conf = conf or vmcloud.conf.CONF
    log.set_defaults(logging_context_format_string=CONTEXT_FORMAT)
    try:
        log.register_options(conf)
    except cfg.ArgsAlreadyParsedError:
        pass  # registered by an earlier command of this process, before it parsed
