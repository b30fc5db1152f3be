from oslo_config import cfg

mirror_group = cfg.OptGroup(
    'mirror', title='Image mirrors',
    help='The copy-on-reference local disks of a compute node, served over NBD.')

mirror_opts = [
    cfg.StrOpt('mirrors_path', default='$state_path/mirrors',
               help='Directory of per-instance mirror state: the local copy of written '
                    'chunks and the persistent dirty map.'),
    cfg.StrOpt('cache_path', default='$state_path/chunk-cache',
               help='Directory of the node\'s chunk cache, shared by all its mirrors.'),
    cfg.IntOpt('cache_size', default=20 * 1024 ** 3, min=16 * 1024 ** 2,
               help='Bytes of chunks the node cache keeps before it evicts the least '
                    'recently used ones.'),
    cfg.StrOpt('nbd_socket', default='$state_path/mirror-nbd.sock',
               help='Unix socket on which the node serves its mirrors over NBD.'),
    cfg.StrOpt('control_socket', default='$state_path/mirror-control.sock',
               help='Unix socket on which the node\'s mirror service (vmcloud mirror-service) '
                    'takes requests from the compute manager; only its own user may connect.'),
    cfg.IntOpt('fetch_attempts', default=4, min=1,
               help='Attempts to fetch a chunk before the read fails with EIO.'),
    cfg.FloatOpt('fetch_retry_wait', default=0.5, min=0,
                 help='Longest wait in seconds between two fetch attempts (exponential '
                      'back-off up to this).'),
    cfg.IntOpt('prefetch_threads', default=2, min=0,
               help='Threads that prefetch the image\'s recorded boot profile (kept in '
                    'the warehouse, shared by every node) in the background; 0 turns '
                    'prefetching off.'),
    cfg.IntOpt('nbd_connection_buffer', default=64 * 1024 ** 2, min=1024 ** 2,
               help='Bytes of requests and unsent replies one NBD connection may hold '
                    'before the server stops reading its requests (one request alone '
                    'always goes ahead).'),
    cfg.IntOpt('nbd_buffer', default=256 * 1024 ** 2, min=1024 ** 2,
               help='Bytes of requests and unsent replies all NBD connections of the '
                    'node may hold together; beyond it no connection reads requests.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(mirror_group)
    conf.register_opts(mirror_opts, group=mirror_group)


def list_opts() -> dict:
    return {mirror_group: mirror_opts}
