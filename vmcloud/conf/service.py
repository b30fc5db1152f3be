import socket

from oslo_config import cfg

service_opts = [
    cfg.StrOpt('host', default=socket.gethostname(), sample_default='<hostname>',
               help='Name of this compute node, unique in the cloud; its RPC server '
                    'listens on this name.'),
    cfg.IntOpt('heartbeat_interval', default=5, min=1,
               help='Seconds between two heartbeats a compute manager sends the dispatcher.'),
    cfg.IntOpt('service_down_time', default=20, min=2,
               help='Seconds without a heartbeat after which the dispatcher marks a compute '
                    'node unknown, and its instances with it: they are neither rebuilt nor '
                    'given up on, but reconciled with what the node runs when it reports '
                    'again. Only `vmcloud host fence` has them rebuilt elsewhere. Until then '
                    'another node may not take its name.'),
    cfg.IntOpt('build_timeout', default=900, min=1,
               help='Seconds one build attempt may take before the dispatcher gives it up '
                    '(retried elsewhere, up to [scheduler] max_attempts).'),
    cfg.IntOpt('snapshot_freeze_timeout', default=30, min=1,
               help='Seconds the dispatcher waits for every instance of a deployment to '
                    'freeze; past it the snapshot is aborted (every frozen guest thawed) and '
                    'ends in error.'),
    cfg.IntOpt('snapshot_pause_limit', default=60, min=1,
               help='Seconds a guest frozen for a snapshot may stay paused: its compute '
                    'manager thaws it itself when the dispatcher did not ask in time (the '
                    'dispatcher died, the network was cut).'),
    cfg.IntOpt('snapshot_upload_timeout', default=1800, min=1,
               help='Seconds a snapshot item may stay uploading before it ends in error.'),
    cfg.IntOpt('event_history', default=500, min=1,
               help='Events (the notifications it sends) the dispatcher keeps in memory for '
                    'the monitoring (`GET /v1/monitoring/events`); the oldest go first.'),
    cfg.IntOpt('cli_timeout', default=10, min=1,
               help='Seconds the CLI waits to reach the message bus, and then for the '
                    'dispatcher to answer a ping, before it fails naming what did not answer '
                    '(the request itself waits rpc_call_timeout).'),
    cfg.IntOpt('rpc_call_timeout', default=120, min=1,
               help='Seconds an RPC call waits for its answer.'),
    cfg.IntOpt('rpc_connect_retries', default=3, min=0,
               help='Times a client (the CLI, middleware) retries connecting to a message '
                    'bus no host of which answers, before it gives up with an error. A '
                    'refused login or virtual host is an error at once.'),
    cfg.IntOpt('rpc_startup_timeout', default=180, min=0,
               help='Seconds a starting service (dispatcher, compute) keeps trying to reach '
                    'a message bus no host of which answers, with a warning before each '
                    'pause, before it exits with an error. A refused login or a malformed '
                    'transport_url is an error at once. Once started, oslo.messaging '
                    'reconnects for as long as it takes.'),
]

database_group = cfg.OptGroup('database', title='Database',
                              help='Where the dispatcher keeps the state of the cloud.')

database_opts = [
    cfg.StrOpt('connection', default='sqlite:///$state_path/vmcloud.sqlite', secret=True,
               help='SQLAlchemy URL: sqlite:///PATH (the default) or '
                    'postgresql+psycopg://USER:PASSWORD@HOST/DB.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(service_opts)
    conf.register_group(database_group)
    conf.register_opts(database_opts, group=database_group)


def list_opts() -> dict:
    return {'DEFAULT': service_opts, database_group: database_opts}
