"""Boot N test guests at once: the qemu and libvirt drivers against bare qemu-system.

    .venv/bin/python benchmarks/boot.py [--counts 1,4,8] [--repeat N]

Time runs from the first start until every guest has printed its boot-done
marker. The baseline starts qemu-system-x86_64 by hand with an equivalent
command line and watches the console files itself.
"""
import argparse
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from tests import guest  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402
from vmcloud.drivers.qemu import accel  # noqa: E402

CONF = cfg.CONF
TIMEOUT = 300


def boot_bare(work: str, count: int, accelerator: str) -> float:
    processes, consoles = [], []
    started = time.perf_counter()
    for i in range(count):
        name = f'bare{i}'
        disk = guest.overlay(work, name)
        console_log = os.path.join(work, f'{name}.log')
        consoles.append(console_log)
        spec = guest.spec(name, disk)
        processes.append(subprocess.Popen(
            ['qemu-system-x86_64', '-name', name, '-machine', f'pc,accel={accelerator}',
             '-nodefaults', '-no-user-config', '-display', 'none', '-m', '256', '-smp', '1',
             '-serial', f'file:{console_log}',
             '-drive', f'file={disk},format=qcow2,if=virtio,cache=writeback',
             '-kernel', spec.kernel, '-initrd', spec.initrd, '-append', spec.cmdline],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        pending = set(consoles)
        deadline = time.monotonic() + TIMEOUT
        while pending and time.monotonic() < deadline:
            for path in list(pending):
                if os.path.exists(path):
                    with open(path, 'rb') as f:
                        if b'VMCLOUD-PHASE boot-done' in f.read():
                            pending.discard(path)
            time.sleep(0.02)
        if pending:
            raise RuntimeError(f'{len(pending)} bare guests did not boot')
        return time.perf_counter() - started
    finally:
        for process in processes:
            process.kill()
            process.wait()


def boot_driver(work: str, count: int, driver_name: str) -> float:
    driver = driver_base.load(CONF, driver_name)
    specs = []
    for i in range(count):
        name = guest.unique_name(f'bench-{driver_name}{i}')
        specs.append(guest.spec(name, guest.overlay(work, name)))
    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda spec: driver.boot(spec, TIMEOUT), specs))
        return time.perf_counter() - started
    finally:
        for spec in specs:
            if spec.name in driver.list_instances():
                driver.destroy(spec.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--counts', default='1,4,8')
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    with common.scratch_state(CONF) as root:
        accelerator = accel.choose(CONF, shutil.which('qemu-system-x86_64'),
                                   guest.spec('probe', guest.path('disk.img')))
        contenders = {
            'bare qemu-system': lambda work, n: boot_bare(work, n, accelerator),
            'qemu driver': lambda work, n: boot_driver(work, n, 'qemu'),
            'libvirt driver': lambda work, n: boot_driver(work, n, 'libvirt'),
        }
        rows = []
        for count in [int(c) for c in args.counts.split(',')]:
            names = list(contenders)

            def run(name: str) -> float:
                work = tempfile.mkdtemp(dir=root)
                try:
                    return contenders[name](work, count)
                finally:
                    shutil.rmtree(work)
            times = common.rotate(names, args.repeat, run)
            baseline = statistics.median(times['bare qemu-system'])
            for name in names:
                median = statistics.median(times[name])
                rows.append((count, name, f'{median:.2f}',
                             ' '.join(f'{t:.2f}' for t in times[name]),
                             f'{median / baseline:.3f}', f'{(median / baseline - 1) * 100:+.1f}%'))
    facts = common.machine()
    facts.update({'accelerator (probed)': accelerator, 'guest': 'test guest (busybox init, '
                  'Debian cloud kernel), 256 MiB, 1 vCPU, qcow2 overlay each',
                  'runs per contender': str(args.repeat)})
    result = common.table(('guests at once', 'contender', 'median s', 'runs s',
                           'time / bare', 'overhead'), rows)
    print(common.table(('fact', 'value'), list(facts.items())))
    print(f'\nTime until every guest printed boot-done\n{result}')
    path = common.write_results('boot', 'Boot benchmark', [
        ('Time until every guest printed boot-done',
         'Rounds rotate the order of the contenders; median of the runs. The goal is a '
         'driver overhead of at most 10% over bare qemu-system.\n\n' + result)], facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
