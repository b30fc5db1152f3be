from oslo_config import cfg

path_opts = [
    cfg.StrOpt('state_path',
               default='/var/lib/vmcloud',
               help='Top-level directory for vmcloud state (warehouse, mirrors, '
                    'database). Other path options default to places under it.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(path_opts)


def list_opts() -> dict:
    return {'DEFAULT': path_opts}
