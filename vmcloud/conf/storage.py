from oslo_config import cfg

storage_group = cfg.OptGroup(
    'storage', title='Image warehouse',
    help='Where images are stored and how untrusted image files are imported.')

storage_opts = [
    cfg.StrOpt('backend', default='file',
               help='Name of the warehouse backend plugin '
                    '(entry point in the vmcloud.storage.backends namespace).'),
    cfg.IntOpt('chunk_size', default=256 * 1024, min=4096,
               help='Chunk size in bytes for newly imported images. Snapshots '
                    'keep the chunk size of their parent.'),
    cfg.IntOpt('max_virtual_size', default=4 * 1024 ** 4, min=1,
               help='Largest virtual size in bytes an imported image may declare. '
                    'Larger images are refused as absurd before they are read.'),
    cfg.IntOpt('qemu_img_address_space', default=1024 ** 3, min=16 * 1024 ** 2,
               help='Address-space limit in bytes for qemu-img when it inspects '
                    'or converts an untrusted image.'),
    cfg.IntOpt('qemu_img_cpu_seconds', default=600, min=1,
               help='CPU-time limit in seconds for one qemu-img run on an '
                    'untrusted image.'),
    cfg.IntOpt('scratch_window', default=256 * 1024 ** 2, min=4096,
               help='Largest scratch space in bytes one import or snapshot of a '
                    'qcow2 file uses: the image is converted to raw this many '
                    'bytes at a time (rounded down to whole chunks), and windows '
                    'with no data are not converted at all. Import is refused if '
                    'not even one window fits in the free space of the scratch '
                    'directory.'),
    cfg.IntOpt('delta_block_size', default=4096, min=512, max=1 << 24,
               help='Bytes of a block, the unit of change a snapshot stores: a chunk '
                    'of which a guest changed only some blocks is stored as a delta, '
                    'those blocks over its parent chunk. A power of two that divides '
                    'chunk_size (refused otherwise).'),
    cfg.IntOpt('delta_max_depth', default=8, min=0, max=64,
               help='Most deltas stacked on one chunk: a snapshot that would stack '
                    'more squashes the chain into one delta over its base (every block '
                    'written since), or stores the chunk whole if that delta would '
                    'change more than delta_max_ratio of it, so reading a chunk reads '
                    'at most this many deltas whatever the number of snapshots. '
                    '0 stores every change as a whole chunk.'),
    cfg.FloatOpt('delta_max_ratio', default=0.5, min=0.0, max=1.0,
                 help='Largest share of a chunk a delta may change: a change of more '
                      'of its bytes is stored as a whole chunk instead.'),
    cfg.IntOpt('gc_lock_timeout', default=60, min=0,
               help='Seconds gc waits for in-progress writes to finish before it '
                    'gives up.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(storage_group)
    conf.register_opts(storage_opts, group=storage_group)


def list_opts() -> dict:
    return {storage_group: storage_opts}
