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
    cfg.StrOpt('peer_address', default='',
               help='Address on which the node serves the chunks of its cache to the other '
                    'compute nodes (its peer chunk server), and turns the peer exchange on: '
                    'a cache miss asks the chunk\'s owners among the live nodes before the '
                    'warehouse. Empty: no peer server and no exchange, chunks come from the '
                    'warehouse alone.'),
    cfg.PortOpt('peer_port', default=9495,
                help='TCP port of the peer chunk server; 0 takes an ephemeral port (several '
                     'nodes in one process, tests).'),
    cfg.IntOpt('peer_replicas', default=2, min=1,
               help='Owners of each chunk among the live compute nodes (rendezvous hashing); '
                    'the other nodes get the chunk from them, and only the first (its '
                    'primary) fetches it from the warehouse while it is alive.'),
    cfg.FloatOpt('peer_timeout', default=5.0, min=0.01,
                 help='Seconds a peer may stay silent, on connect or between two bytes, '
                      'before the chunk is asked of the next owner (or the warehouse). '
                      'The first bytes of an answer with a chunk may take 4 times as '
                      'long: a peer that lacks the chunk reads it from the warehouse '
                      'first.'),
    cfg.FloatOpt('peer_skip_time', default=10.0, min=0,
                 help='Seconds a peer that failed (refused, timed out, answered an HTTP '
                      'error or corrupt bytes) is passed over before it is asked again.'),
    cfg.IntOpt('peer_upload_rate', default=100 * 1024 ** 2, min=0,
               help='Bytes per second the node serves to its peers, all connections '
                    'together; 0 is no limit.'),
    cfg.StrOpt('peer_token', default='', secret=True,
               help='Bearer token every peer chunk server of the cluster asks for and '
                    'every node sends; empty: none (the all-in-one cloud, left empty, '
                    'makes a random one for its nodes).'),
    cfg.IntOpt('peer_threads', default=64, min=1,
               help='Peer requests the node serves at once; more are answered 503 (busy) '
                    'and the asking node goes on to the next owner.'),
    cfg.IntOpt('peer_connections_per_address', default=32, min=1,
               help='Connections the peer chunk server keeps open from one address, idle '
                    'keep-alive ones included; more are answered 503 (busy) and closed, so '
                    'one host cannot take every connection. A node keeps up to 8 idle '
                    'connections to each peer and opens more while it misses many chunks '
                    'at once; several nodes on one address (the all-in-one mode) share '
                    'the number.'),
    cfg.FloatOpt('owned_cache_share', default=0.5, min=0, max=1,
                 help='Share of cache_size kept for the chunks this node owns (the ones '
                      'its peers ask it for): while owned chunks hold less, eviction takes '
                      'chunks the node does not own; while they hold more, owned ones.'),
    cfg.BoolOpt('replicate_snapshots', default=True,
                help='With the peer exchange on, a snapshot\'s new chunks go to their owners '
                     'among the compute nodes first (deployable at once: replicated) and '
                     'are written to the warehouse in the background (then persistent). '
                     'False: a snapshot is written to the warehouse before it is available, '
                     'as without peers.'),
    cfg.IntOpt('replica_size', default=2 * 1024 ** 3, min=0,
               help='Bytes of the chunk cache that may hold snapshot chunks not yet in the '
                    'warehouse (unpersisted replicas: never evicted); a node over it refuses '
                    'more, and the uploader writes those chunks to the warehouse itself.'),
    cfg.FloatOpt('persist_check_interval', default=30.0, min=0.01,
                 help='Seconds between two looks at the unpersisted replicas the node '
                      'holds: one the warehouse has becomes an ordinary cache entry; one it '
                      'lacks whose uploader is gone is written by its primary owner. Also '
                      'how long an uploader that cannot reach the warehouse waits before it '
                      'tries again.'),
    cfg.IntOpt('dirty_block_size', default=4096, min=512,
               help='Bytes of the guest blocks a mirror tracks its writes in, within each '
                    'chunk: a snapshot stores what the guest wrote in these, not whole '
                    'chunks, and a write that covers whole blocks needs no fetch. A power '
                    'of two that divides the image\'s chunk size (a mirror of an image '
                    'whose chunk size it does not divide is refused). A mirror keeps the '
                    'block size it was created with.'),
    cfg.StrOpt('trace_path', default='',
               help='Directory in which every mirror records its NBD block I/O, as '
                    '<trace_path>/<mirror name>.trace (the format is in doc/replay.md), '
                    'for the replay driver; each later serving of the same mirror into a '
                    'file of its own, <mirror name>@2.trace, @3 and so on. Empty: nothing '
                    'is recorded.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(mirror_group)
    conf.register_opts(mirror_opts, group=mirror_group)


def list_opts() -> dict:
    return {mirror_group: mirror_opts}
