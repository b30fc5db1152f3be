from oslo_config import cfg

replay_group = cfg.OptGroup(
    'replay', title='Replay driver',
    help='The replay driver (vmcloud.drivers.replay): each "instance" replays a block I/O '
         'trace recorded from a real guest against its NBD disk, so that a node hosts '
         'dozens of instances whose storage behaviour is real while their CPU is not.')

replay_opts = [
    cfg.StrOpt('trace', default='',
               help='The block I/O trace every instance replays (a file as the mirror '
                    'records with [mirror] trace_path, or tools/record-boot-trace.py '
                    'writes; format in doc/replay.md, gzip if the name ends in .gz). '
                    'Empty: the driver cannot spawn.'),
    cfg.FloatOpt('time_scale', default=1.0, min=0,
                 help='Factor on the recorded think time (the time the guest had no '
                      'request outstanding before the next one): 1 is as recorded, 0 '
                      'issues the requests back to back.'),
    cfg.IntOpt('queue_depth', default=1, min=1, max=64,
               help='Requests one instance has in flight at most, each on an NBD '
                    'connection of its own. 1: one at a time, in recorded order; more '
                    'lets requests that overlapped in the recording overlap again.'),
    cfg.FloatOpt('io_timeout', default=60.0, min=0.1,
                 help='Seconds the disk may take to answer one request before the '
                      'instance crashes, as a guest kernel gives up on a dead disk.'),
    cfg.IntOpt('host_cpus', default=128, min=1,
               help='CPUs the node offers to instances: replayed instances cost no CPU '
                    'to speak of, so a node of two cores can host dozens of them.'),
    cfg.IntOpt('host_memory_mib', default=128 * 1024, min=16,
               help='MiB of memory the node offers to instances (a replayed instance '
                    'holds a few MiB whatever its memory_mib).'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(replay_group)
    conf.register_opts(replay_opts, group=replay_group)


def list_opts() -> dict:
    return {replay_group: replay_opts}
