"""Options of the warehouse service (``vmcloud warehouse``).

The client side, ``[storage] backend = http``, has its own group
``[storage_http]``, declared by the backend (vmcloud.storage.backends.http).
"""
from oslo_config import cfg

warehouse_service_group = cfg.OptGroup(
    'warehouse_service', title='Warehouse service',
    help='The warehouse served over HTTP to compute nodes and the CLI by '
         '"vmcloud warehouse". It serves the backend named by [storage] backend.')

warehouse_service_opts = [
    cfg.HostAddressOpt('host', default='127.0.0.1',
                       help='Address the service listens on. The default serves only '
                            'this machine: set the address of the storage network.'),
    cfg.PortOpt('port', default=9494,
                help='TCP port the service listens on (0: any free port, printed at start).'),
    cfg.StrOpt('token', secret=True, default='',
               help='Bearer token every client must send ([storage_http] token). '
                    'Required: the service refuses to start without one.'),
    cfg.BoolOpt('allow_anonymous_reads', default=False,
                help='Serve reads (GET, HEAD) without the token. Writes, locks and gc '
                     'always need it.'),
    cfg.StrOpt('cert_file',
               help='PEM certificate (with its chain) to serve HTTPS; with key_file.'),
    cfg.StrOpt('key_file', help='PEM private key of cert_file.'),
    cfg.FloatOpt('max_lease_ttl', default=300.0, min=1.0,
                 help='Longest time in seconds a lock lease lasts without renewal; '
                      'clients ask for [storage_http] lease_ttl, at most this.'),
    cfg.IntOpt('threads', default=16, min=1,
               help='Threads running backend calls (chunk reads, writes, listings).'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(warehouse_service_group)
    conf.register_opts(warehouse_service_opts, group=warehouse_service_group)


def list_opts() -> dict:
    return {warehouse_service_group: warehouse_service_opts}
