import os

from oslo_config import cfg

gateway_group = cfg.OptGroup(
    'gateway', title='Gateway',
    help='The gateway host: the only way clients reach the applications in the guests. '
         'vmcloud gateway runs HAProxy and programs it through its runtime API; the '
         'dispatcher allocates each exposed deployment a listener port from these ranges.')

gateway_opts = [
    cfg.StrOpt('name', default='$host',
               help='The gateway\'s name: its RPC server and its registration.'),
    cfg.StrOpt('listen_address', default='0.0.0.0',
               help='Address HAProxy binds every listener port on.'),
    cfg.StrOpt('listener_ports', default='21000-21999',
               help='Port range (LOW-HIGH) of HTTP applications\' listeners: one port per '
                    'deployment, allocated by the dispatcher.'),
    cfg.StrOpt('tcp_listener_ports', default='22000-22999',
               help='Port range (LOW-HIGH) of TCP applications\' listeners.'),
    cfg.IntOpt('backend_slots', default=64, min=1, max=4096,
               help='Backends HAProxy holds per protocol: the most deployments one gateway '
                    'serves at once for each protocol (HAProxy 2.6 cannot add a backend '
                    'at runtime, so they are made empty at start and assigned later).'),
    cfg.IntOpt('default_connection_limit', default=1000, min=1,
               help='Connection limit of the cloud named default, made with the database.'),
    cfg.FloatOpt('poll_interval', default=2.0, min=0.1,
                 help='Seconds between two readings of the dispatcher\'s state and of the '
                      'hosts\' loads (the dispatcher also tells the gateway at once when '
                      'an instance becomes active or goes).'),
    cfg.StrOpt('state_path', default='',
               help='Directory of HAProxy\'s config, sockets, maps, pid file and the '
                    'counters of its past runs; empty means $state_path/gateway.'),
    cfg.StrOpt('haproxy_binary', default='/usr/sbin/haproxy',
               help='The HAProxy program (2.6 or later: dynamic servers).'),
    cfg.IntOpt('check_interval_ms', default=500, min=100,
               help='Milliseconds between two TCP checks of each instance by HAProxy: an '
                    'instance failing two in a row takes no new connection.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(gateway_group)
    conf.register_opts(gateway_opts, group=gateway_group)


def list_opts() -> dict:
    return {gateway_group: gateway_opts}


def state_dir(conf: cfg.ConfigOpts) -> str:
    """The gateway's directory: ``[gateway] state_path``, or ``$state_path/gateway``.

    (oslo.config would read ``$state_path`` in this group's own default as the group's
    option, itself, not ``[DEFAULT] state_path``.)
    """
    return os.path.abspath(conf.gateway.state_path or os.path.join(conf.state_path, 'gateway'))
