"""``vmcloud api``: serve the REST API, its dashboard and /metrics until SIGTERM.

It reads ``[api] listen_address`` and ``port``, reaches the dispatcher on ``[DEFAULT]
transport_url`` and its users and tokens in ``[database] connection``: beside the
dispatcher with SQLite, or on any host with PostgreSQL. It logs through oslo.log, each
line of a request with its request id (the X-OpenStack-Request-ID of the answer), the
same id the dispatcher's lines for that request show.
"""
import argparse

from oslo_config import cfg
from oslo_log import log

from vmcloud import rpc
from vmcloud.api import app
from vmcloud.cmd import service


def do_api(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: ConfigError (the address cannot be listened on, a bad [database]
        connection), MessageBusRefused, MessageBusUnreachable (see rpc.wait_for_bus);
        DatabaseError."""
    log.setup(conf, 'vmcloud')
    rpc.wait_for_bus(conf)
    server = app.ApiServer(conf)
    return service.run(server, server.stop)


def add_parser(groups: argparse._SubParsersAction) -> None:
    sub = groups.add_parser(
        'api', help='run the REST API service (and its dashboard)',
        description='Serve the REST API on [api] listen_address and port, over the '
                    'dispatcher; `vmcloud user create` makes its first user.')
    sub.set_defaults(handler=do_api, log=True)
