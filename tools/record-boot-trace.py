#!/usr/bin/env python3
"""Record a block I/O trace of the realistic guest (systemd) booting, for the replay driver.

    .venv/bin/python tools/record-boot-trace.py OUTPUT [--memory MIB] [--timeout S]

The realistic guest's root filesystem (tools/guest/build-realistic-guest.sh; where
tests/guest.py finds it) is imported into a scratch warehouse and booted with the qemu
driver over a mirror whose node has ``[mirror] trace_path`` set; each phase marker the
guest prints is told to the mirror as the compute manager would (boot-done, app-running,
then shutdown-started once the power button was pressed), and the guest is stopped
with the power button. The mirror's trace, whole once the mirror is removed, is written
to OUTPUT (gzip if its name ends in .gz; the format is in doc/replay.md). Prints what
it wrote: requests, bytes read and written, the markers' times, the seconds it took.
"""
import argparse
import os
import sys
import threading
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from tests import guest  # noqa: E402
from vmcloud import exception  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402
from vmcloud.mirror import manager as manager_mod  # noqa: E402
from vmcloud.nbd import trace as trace_mod  # noqa: E402
from vmcloud.storage import warehouse as warehouse_mod  # noqa: E402

CONF = cfg.CONF
MIB = 1024 * 1024


def follow(driver: driver_base.Driver, mirrors: manager_mod.MirrorManager, name: str,
           timeout: float, seen: dict[str, float], started: float) -> threading.Thread:
    """Tell the mirror each marker as soon as the guest prints it, in order."""
    def run() -> None:
        for marker in driver_base.PHASES:
            try:
                driver.wait_for_event(name, marker, timeout)
            except exception.VmcloudError:
                return
            mirrors.set_phase(name, marker)
            seen[marker] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True, name=f'follow-{name}')
    thread.start()
    return thread


def record(output: str, memory_mib: int, timeout: float) -> dict:
    with common.scratch_state(CONF) as root:
        traces = os.path.join(root, 'traces')
        CONF.set_override('trace_path', traces, 'mirror')
        # Every read the guest makes is its own, not a prefetch's.
        CONF.set_override('prefetch_threads', 0, 'mirror')
        store = warehouse_mod.Warehouse(CONF)
        store.import_image(guest.realistic_disk(), 'realistic')
        driver = driver_base.load(CONF, 'qemu')
        name = f'record-{os.getpid()}'
        seen: dict[str, float] = {}
        with manager_mod.MirrorManager(CONF, store) as node:
            mirror = node.create(name, 'realistic')
            started = time.monotonic()
            try:
                driver.spawn(guest.realistic_spec(name, mirror.uri, disk_format='raw',
                                                  memory_mib=memory_mib))
                follower = follow(driver, node, name, timeout, seen, started)
                while driver_base.APP_RUNNING not in seen:
                    if not follower.is_alive():
                        raise SystemExit(f'the guest did not reach {driver_base.APP_RUNNING}: '
                                         f'{driver.console_log(name)[-2000:]}')
                    time.sleep(0.05)
                forced = driver.stop(name, timeout=timeout)
                follower.join(timeout)
            finally:
                if name in driver.list_instances():
                    driver.destroy(name)
            took = time.monotonic() - started
            fetched = node.cache.stats.fetched_bytes
            node.remove(name)   # the trace is whole once its mirror is gone
        recorded = trace_mod.read(os.path.join(traces, f'{name}.trace'))
    trace_mod.write(output, recorded.size, recorded.block, recorded.events)
    return {'trace': recorded, 'seconds': took, 'seen': seen, 'forced': forced,
            'fetched': fetched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('output', help='the trace to write (.gz: compressed)')
    parser.add_argument('--memory', type=int, default=512, help='guest memory in MiB')
    parser.add_argument('--timeout', type=float, default=600,
                        help='seconds for each of boot, application and shutdown')
    args = parser.parse_args()
    output = os.path.abspath(args.output)
    result = record(output, args.memory, args.timeout)
    trace = result['trace']
    requests = trace.requests()
    counts = {op: sum(1 for e in requests if e.op == op) for op in trace_mod.REQUESTS}
    markers = {e.marker: e.ms / 1000 for e in trace.events if e.op == trace_mod.PHASE}
    print(f'wrote {output} ({os.path.getsize(output)} bytes), format version '
          f'{trace_mod.VERSION}')
    print(f'requests: {len(requests)} ('
          + ', '.join(f'{op} {counts[op]}' for op in trace_mod.REQUESTS) + ')')
    print(f'bytes read: {trace.bytes_of(trace_mod.READ)} '
          f'({trace.bytes_of(trace_mod.READ) / MIB:.1f} MiB), written: '
          f'{trace.bytes_of(trace_mod.WRITE)} ({trace.bytes_of(trace_mod.WRITE) / MIB:.1f} MiB)'
          f', zeroed {trace.bytes_of(trace_mod.WRITE_ZEROES)}, trimmed '
          f'{trace.bytes_of(trace_mod.TRIM)}')
    print(f'chunks of {trace.block} bytes touched: {len(trace.blocks())} of '
          f'{-(-trace.size // trace.block)} (read {len(trace.blocks([trace_mod.READ]))}); '
          f'fetched from the warehouse: {result["fetched"]} bytes')
    print('markers (s since the disk was opened): '
          + ', '.join(f'{m} {t:.2f}' for m, t in markers.items()))
    print(f'seconds: {result["seconds"]:.1f} from spawn to powered off'
          + (' (forced off: the guest did not shut down by itself)' if result['forced'] else ''))


if __name__ == '__main__':
    main()
