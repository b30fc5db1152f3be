"""``vmcloud gateway``: run the gateway service until SIGTERM; ``vmcloud gateway
connections|stats``: what the gateway holds now, asked of the dispatcher.

The service leaves HAProxy running when it stops: clients keep their connections, and
the next ``vmcloud gateway`` adopts it. ``--stop-haproxy`` stops it too (demos, tests).
"""
import argparse
import functools

from oslo_config import cfg
from oslo_log import log

from vmcloud import network as network_mod
from vmcloud import rpc
from vmcloud.cmd import common
from vmcloud.cmd import output
from vmcloud.cmd import service
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.gateway import haproxy as haproxy_mod
from vmcloud.gateway import manager as gateway_manager

CONNECTION_COLUMNS = ('client', 'client_port', 'cloud', 'application', 'deployment',
                      'instance', 'listener_port', 'started_at')
STATS_COLUMNS = ('cloud', 'connection_limit', 'applications_deployed',
                 'applications_running', 'users_connected', 'active_connections',
                 'available_connections', 'total_connections', 'rejected_connections',
                 'bytes_in', 'bytes_out')

# Looked up at each call, as module names: a test gives the commands a fake API.
_api = common.dispatcher_api


def do_gateway(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """Run the gateway service.

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable (see
        rpc.wait_for_bus); HAProxyError if HAProxy cannot be started; MessagingError if
        the dispatcher does not answer within [DEFAULT] rpc_startup_timeout;
        NetworkError for an unknown network agent.
    """
    log.setup(conf, 'vmcloud')
    # Before any wait: a network agent that cannot be loaded is a configuration error.
    agent = network_mod.load_agent(conf)
    rpc.wait_for_bus(conf)
    gateway = gateway_manager.GatewayManager(
        conf, dispatcher_rpcapi.DispatcherAPI(conf, retry=-1), haproxy_mod.HAProxy(conf),
        agent)
    return service.run(gateway, functools.partial(gateway.stop, haproxy=args.stop_haproxy))


@common.one_request
def do_connections(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: CloudNotFound; GatewayUnavailable if no gateway answers."""
    records = _api(conf).gateway_connections(args.cloud)
    output.emit(sorted(records, key=_connection_order), CONNECTION_COLUMNS, args.fmt)
    return 0


def _connection_order(record: dict) -> tuple:
    return (record.get('cloud') or '', record.get('listener_port') or 0,
            record.get('started_at') or 0, record.get('client') or '',
            record.get('client_port') or 0)


@common.one_request
def do_stats(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    """:raises: CloudNotFound; GatewayUnavailable if no gateway answers."""
    stats = _api(conf).gateway_stats(args.cloud)
    if args.fmt == 'json':
        output.emit_record(stats, args.fmt)
        return 0
    rows = [stats[name] for name in sorted(stats)]
    output.emit(rows, STATS_COLUMNS, args.fmt)
    # Each instance's share of its cloud's connections: what the weights did.
    per_instance = [{'cloud': row['cloud'], 'instance': ident, 'active_connections': active}
                    for row in rows for ident, active in sorted(row['per_instance'].items())]
    if per_instance:
        output.emit(per_instance, ('cloud', 'instance', 'active_connections'), args.fmt)
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    formatted = common.format_parent()
    gateway = groups.add_parser(
        'gateway', help='run the gateway service; its connections and stats',
        description='Without an action, run the gateway service: HAProxy programmed '
                    'from the dispatcher\'s clouds, applications and deployments.')
    gateway.set_defaults(handler=do_gateway, log=True)
    gateway.add_argument('--stop-haproxy', action='store_true',
                         help='stop HAProxy too when the service stops (by default it '
                              'keeps running with its connections, for the next service '
                              'to adopt)')
    actions = gateway.add_subparsers(dest='action', metavar='ACTION')
    for action, handler, help_text in (
            ('connections', do_connections, 'the client connections open now'),
            ('stats', do_stats, "each cloud's connections, users, bytes and refusals")):
        sub = actions.add_parser(action, parents=[formatted], help=help_text)
        sub.set_defaults(handler=handler, log=False)
        sub.add_argument('--cloud', help='only this cloud')
