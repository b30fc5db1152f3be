"""``vmcloud mirror serve``: serve instance disks over NBD from this node;
``vmcloud mirror-service``: the node's mirror service, which the compute manager uses."""
import argparse
import signal
import sys
import threading

from oslo_config import cfg

from vmcloud import exception
from vmcloud.mirror import manager as manager_mod


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def do_serve(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    stop = _stop_on_signals()
    with manager_mod.MirrorManager(conf) as manager:
        for name in args.names:
            if args.image:
                try:
                    mirror = manager.create(name, args.image)
                except exception.MirrorExists:
                    mirror = manager.open(name)
            else:
                mirror = manager.open(name)
            print(mirror.uri, flush=True)
        print('serving', flush=True)
        stop.wait()
        stats = manager.cache.stats
    print(f'fetched {stats.fetched_bytes} bytes ({stats.fetched_chunks} chunks) from the '
          f'warehouse; {stats.hits} chunk reads served from this node, {stats.misses} waited '
          'for a fetch', file=sys.stderr)
    return 0


def do_service(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Serve until SIGTERM; prints 'running' once the control socket takes requests.

    :raises: StateLocked naming the owner if another service has this node's state;
        MirrorError; ConfigError.
    """
    from oslo_log import log

    # Imported here: it brings vmcloud.rpc (oslo.messaging), which `mirror serve` needs not.
    from vmcloud.mirror import service as service_mod

    log.setup(conf, 'vmcloud')
    stop = _stop_on_signals()
    service = service_mod.MirrorService(conf).start()
    print('running', flush=True)
    stop.wait()
    service.stop()
    return 0


def add_parsers(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser('mirror', help="serve instances' disks over NBD")
    commands = parser.add_subparsers(dest='command', required=True, metavar='ACTION')
    sub = commands.add_parser(
        'serve', help='serve mirrors until SIGTERM; prints one NBD URI per mirror, then "serving"')
    sub.set_defaults(handler=do_serve)
    sub.add_argument('names', nargs='+', metavar='NAME')
    sub.add_argument('--image', metavar='IMAGE[:VERSION]',
                     help='create the mirrors that do not exist yet from this image; '
                          'without it, only existing mirrors are served')
    sub = groups.add_parser(
        'mirror-service',
        help="run this node's mirror service: the guests' disks, outliving the compute manager")
    sub.set_defaults(handler=do_service, log=True)
