"""VM consolidation policies on the PlanetLab days, beside CloudSim 3.0.3.

Runs every policy of the CloudSim table (issue 7) on 20110303 and on the other
shared days. With ``--cloudsim CMD`` CloudSim itself runs each case side by side in
the same run, and its energy, migrations, SLA and time go beside ours with their
ratios; CMD is called as ``CMD OVERLOAD SELECTION PARAM DAY TRACES_DIR`` (no
migration is asked as ``dvfs mmt 0``) and must print CloudSim's Helper results.
CloudSim is not part of vmcloud: build 3.0.3 yourself and wrap its PlanetLab runner.
Without it, 20110303 is compared with CloudSim's published numbers.

Times: our wall and CPU time per 24 h run (the best of ``--repeat``), CloudSim's
wall time and the CPU time of its JVM. On 20110303 each policy also runs on the
numpy paths alone (the compiled kernels left out), as the baseline of their gain.
Memory: the peak Python heap of one run (tracemalloc, in a separate run so it does
not slow the timed one), and the maximum resident size of this process and of
CloudSim's JVM.

    .venv/bin/python benchmarks/consolidation.py [--quick] [--cloudsim CMD]
"""
import argparse
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import tracemalloc

# One thread per run, like the simulation itself: multi-threaded BLAS only adds CPU
# time for matrices this small (MC's 30 x 30 Gram matrices). Set before numpy loads.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from vmcloud.scheduler.consolidation import compiled  # noqa: E402
from vmcloud.sim import engine  # noqa: E402
from vmcloud.sim import traces  # noqa: E402

ANCHOR = '20110303'
POLICIES = [('lr-mmt', 1.2), ('thr-mmt', 0.8), ('iqr-mmt', 1.5), ('mad-mmt', 2.5),
            ('lr-mc', 1.2), ('none', None)]
# CloudSim 3.0.3 on 20110303, 800 hosts, file names sorted (issue 7):
# energy kWh, migrations, SLATAH, PDM
PUBLISHED = {
    'lr-mmt': (163.48, 27859, 0.0586, 0.0008),
    'thr-mmt': (192.62, 26711, 0.0491, 0.00065),
    'iqr-mmt': (189.98, 26282, 0.0482, 0.00065),
    'mad-mmt': (185.79, 26556, 0.0505, 0.0007),
    'lr-mc': (151.07, 23380, 0.0701, 0.0010),
    'none': (802.75, 0, 0.0, 0.0),
}
HELPER_LINES = {
    'energy': r'Energy consumption: ([\d.]+) kWh',
    'migrations': r'Number of VM migrations: (\d+)',
    'slatah': r'SLA time per active host: ([\d.]+)%',
    'pdm': r'SLA perf degradation due to migration: ([\d.]+)%',
}


def ours(day, policy, param, repeat):
    best = None
    for _ in range(repeat):
        started, cpu = time.perf_counter(), time.process_time()
        result = engine.simulate(day, policy, param)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        if best is None or cpu < best[2]:
            best = (result, wall, cpu)
    return best


def cloudsim(command, day, policy, param):
    """CloudSim's energy, migrations, SLATAH, PDM, wall and CPU seconds for one case.

    :raises: RuntimeError if it fails or prints no results.
    """
    if policy == 'none':
        args = ['dvfs', 'mmt', '0']
    else:
        overload, selection = policy.split('-')
        args = [overload, selection, str(param)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(shlex.split(command) + args + [day, traces.root()],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = {k: re.search(p, done.stdout) for k, p in HELPER_LINES.items()}
    if done.returncode or not all(found.values()):
        raise RuntimeError(f'CloudSim failed on {day} {policy}: {done.stderr[-500:]}')
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return (float(found['energy'].group(1)), int(found['migrations'].group(1)),
            float(found['slatah'].group(1)) / 100, float(found['pdm'].group(1)) / 100,
            wall, cpu)


def peak_heap(day, policy, param):
    tracemalloc.start()
    engine.simulate(day, policy, param)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def pct(x):
    return f'{x * 100:.2f}%'


def ratio(mine, theirs):
    return f'{mine / theirs:.3f}' if theirs else ('1.000' if not mine else 'n/a')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help=f'only {ANCHOR}')
    parser.add_argument('--repeat', type=int, default=2, help='our runs per case (best CPU)')
    parser.add_argument('--cloudsim', default=os.environ.get('VMCLOUD_CLOUDSIM'),
                        help='command running CloudSim 3.0.3 on one case (see above)')
    args = parser.parse_args()
    days = [ANCHOR] if args.quick else traces.days()
    anchor_rows, day_rows = [], []
    for day in days:
        for policy, param in POLICIES:
            result, wall, cpu = ours(day, policy, param, args.repeat)
            label = f'{policy.upper()} {param}' if param is not None else 'no migration'
            theirs = cloudsim(args.cloudsim, day, policy, param) if args.cloudsim else None
            print(f'{day} {label}: {result.energy_kwh:.2f} kWh, {result.migrations} migrations, '
                  f'{wall:.2f} s wall, {cpu:.2f} s CPU'
                  + (f'; CloudSim {theirs[0]:.2f} kWh, {theirs[1]} migrations, '
                     f'{theirs[4]:.2f} s wall' if theirs else ''), flush=True)
            if day == ANCHOR:
                with compiled.disabled():
                    numpy_result, _, numpy_cpu = ours(day, policy, param, args.repeat)
                same = (numpy_result.energy_kwh, numpy_result.migrations) == (
                    result.energy_kwh, result.migrations)
                published = PUBLISHED[policy]
                reference = theirs or published
                anchor_rows.append([
                    label, f'{result.energy_kwh:.2f}', f'{reference[0]:.2f}',
                    f'{published[0]:.2f}', ratio(result.energy_kwh, reference[0]),
                    result.migrations, reference[1], published[1],
                    ratio(result.migrations, reference[1]),
                    pct(result.slatah), pct(reference[2]), pct(result.pdm), pct(reference[3]),
                    f'{cpu:.2f}', f'{numpy_cpu:.2f}', f'{numpy_cpu / cpu:.1f}x',
                    'yes' if same else 'NO', common.mib(peak_heap(day, policy, param))])
            if theirs:
                day_rows.append([
                    day, label, result.vms, f'{result.energy_kwh:.2f}', f'{theirs[0]:.2f}',
                    ratio(result.energy_kwh, theirs[0]), result.migrations, theirs[1],
                    ratio(result.migrations, theirs[1]), pct(result.slatah), pct(theirs[2]),
                    f'{wall:.2f}', f'{cpu:.2f}', f'{theirs[4]:.2f}', f'{theirs[5]:.2f}',
                    f'{theirs[4] / wall:.1f}x'])
            else:
                day_rows.append([
                    day, label, result.vms, f'{result.energy_kwh:.2f}', result.migrations,
                    pct(result.slatah), pct(result.pdm), f'{result.slav:.2e}',
                    f'{result.esv:.2e}', result.host_shutdowns, f'{wall:.2f}', f'{cpu:.2f}'])
    source = 'CloudSim run here' if args.cloudsim else 'CloudSim published'
    anchor = common.table(
        ['policy', 'energy kWh', source, 'published', 'ratio', 'migrations', source,
         'published', 'ratio', 'SLATAH', 'CloudSim', 'PDM', 'CloudSim', 'our CPU s',
         'numpy path CPU s', 'compiled gain', 'same result', 'peak heap'], anchor_rows)
    if args.cloudsim:
        every = common.table(
            ['day', 'policy', 'VMs', 'energy kWh', 'CloudSim', 'ratio', 'migrations',
             'CloudSim', 'ratio', 'SLATAH', 'CloudSim', 'our wall s', 'our CPU s',
             'CloudSim wall s', 'CloudSim CPU s', 'faster'], day_rows)
    else:
        every = common.table(
            ['day', 'policy', 'VMs', 'energy kWh', 'migrations', 'SLATAH', 'PDM', 'SLAV', 'ESV',
             'shutdowns', 'wall s', 'CPU s'], day_rows)
    ours_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    facts = {
        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        'cpus': str(os.cpu_count()),
        'python': platform.python_version(),
        'hosts': '800 (HP ML110 G4 / G5 alternating)',
        'compiled kernels': 'built' if compiled.kernels else 'missing (numpy paths)',
        'CloudSim': args.cloudsim or 'not run (published numbers)',
        'our process max RSS': common.mib(ours_rss),
        'CloudSim JVM max RSS': common.mib(children_rss) if args.cloudsim else '-',
        'load average at the end': ' '.join(f'{x:.1f}' for x in os.getloadavg()),
    }
    path = common.write_results(
        'consolidation', 'VM consolidation on PlanetLab traces',
        [(f'{ANCHOR}: ours beside CloudSim 3.0.3', anchor),
         ('Every shared day' + (', beside CloudSim run here' if args.cloudsim else ''), every)],
        facts)
    print(anchor)
    print(every)
    print(f'written to {path}')


if __name__ == '__main__':
    main()
