"""A warehouse operation that SIGKILLs itself just before its Nth filesystem call.

Run as ``python -m tests.functional.storage.crash_child CONFIG KILL_AT OPERATION ARGS...``.
KILL_AT 0 runs to completion and prints how many filesystem calls it made, so
the parent can spread kill points over the whole operation.
"""
import os
import signal
import sys

from oslo_config import cfg

import vmcloud.conf  # noqa: F401 - registers options
from vmcloud.storage import warehouse
from vmcloud.storage.manifest import VersionRef

# Every call that changes what is on disk, or makes it durable.
_INTERCEPTED = ('write', 'fsync', 'rename', 'replace', 'link', 'unlink', 'mkdir', 'rmdir')


def _intercept(kill_at: int) -> list[int]:
    calls = [0]

    def wrap(name):
        real = getattr(os, name)

        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        setattr(os, name, counted)

    for name in _INTERCEPTED:
        wrap(name)
    return calls


def main(argv: list[str]) -> None:
    config, kill_at, operation, *args = argv
    cfg.CONF(['--config-file', config], project='vmcloud')
    store = warehouse.Warehouse(cfg.CONF)
    calls = _intercept(int(kill_at))
    if operation == 'import':
        store.import_image(args[0], args[1])
    elif operation == 'snapshot':
        parent = VersionRef(args[0], int(args[1]))
        store.snapshot_file(parent, args[2])
    elif operation == 'gc':
        store.gc()
    else:
        raise SystemExit(f'unknown operation {operation}')
    print(calls[0])


if __name__ == '__main__':
    main(sys.argv[1:])
