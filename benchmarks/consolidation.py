"""VM consolidation policies on the PlanetLab days, beside CloudSim 3.0.3's published numbers.

Runs every policy of the CloudSim table (issue 7) on 20110303 and on the other
shared days; for 20110303 puts CloudSim's energy and migrations beside ours with
their ratio. Also the wall and CPU time of each 24 h run (the CPU time of this process
is what to compare on a shared machine) and the peak Python heap of one
run (tracemalloc, measured in a separate run so it does not slow the timed one).

    .venv/bin/python benchmarks/consolidation.py [--quick]   # --quick: 20110303 only
"""
import argparse
import os
import platform
import resource
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from vmcloud.sim import engine  # noqa: E402
from vmcloud.sim import traces  # noqa: E402

ANCHOR = '20110303'
POLICIES = [('lr-mmt', 1.2), ('thr-mmt', 0.8), ('iqr-mmt', 1.5), ('mad-mmt', 2.5),
            ('lr-mc', 1.2), ('none', None)]
# CloudSim 3.0.3 on 20110303, 800 hosts, file names sorted (issue 7)
CLOUDSIM = {
    'lr-mmt': (163.48, 27859, 0.0586, 0.0008),
    'thr-mmt': (192.62, 26711, 0.0491, 0.00065),
    'iqr-mmt': (189.98, 26282, 0.0482, 0.00065),
    'mad-mmt': (185.79, 26556, 0.0505, 0.0007),
    'lr-mc': (151.07, 23380, 0.0701, 0.0010),
    'none': (802.75, 0, 0.0, 0.0),
}


def run(day, policy, param):
    started, cpu = time.perf_counter(), time.process_time()
    result = engine.simulate(day, policy, param)
    return result, time.perf_counter() - started, time.process_time() - cpu


def peak_heap(day, policy, param):
    tracemalloc.start()
    engine.simulate(day, policy, param)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def pct(x):
    return f'{x * 100:.2f}%'


def ratio(ours, theirs):
    return f'{ours / theirs:.3f}' if theirs else ('1.000' if not ours else 'n/a')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help=f'only {ANCHOR}')
    args = parser.parse_args()
    days = [ANCHOR] if args.quick else traces.days()
    anchor_rows, day_rows = [], []
    for day in days:
        for policy, param in POLICIES:
            result, wall, cpu = run(day, policy, param)
            label = f'{policy.upper()} {param}' if param is not None else 'no migration'
            print(f'{day} {label}: {result.energy_kwh:.2f} kWh, {result.migrations} migrations, '
                  f'{wall:.2f} s wall, {cpu:.2f} s CPU', flush=True)
            if day == ANCHOR:
                peak = peak_heap(day, policy, param)
                e, m, slatah, pdm = CLOUDSIM[policy]
                anchor_rows.append([
                    label, f'{result.energy_kwh:.2f}', f'{e:.2f}', ratio(result.energy_kwh, e),
                    result.migrations, m, ratio(result.migrations, m),
                    pct(result.slatah), pct(slatah), pct(result.pdm), pct(pdm),
                    f'{result.slav:.2e}', f'{wall:.2f}', f'{cpu:.2f}', common.mib(peak)])
            day_rows.append([day, label, result.vms, f'{result.energy_kwh:.2f}',
                             result.migrations, pct(result.slatah), pct(result.pdm),
                             f'{result.slav:.2e}', f'{result.esv:.2e}', result.host_shutdowns,
                             f'{wall:.2f}', f'{cpu:.2f}'])
    anchor = common.table(
        ['policy', 'energy kWh', 'CloudSim', 'ratio', 'migrations', 'CloudSim', 'ratio',
         'SLATAH', 'CloudSim', 'PDM', 'CloudSim', 'SLAV', 'wall s', 'CPU s', 'peak heap'],
        anchor_rows)
    every = common.table(
        ['day', 'policy', 'VMs', 'energy kWh', 'migrations', 'SLATAH', 'PDM', 'SLAV', 'ESV',
         'shutdowns', 'wall s', 'CPU s'], day_rows)
    facts = {
        'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
        'cpus': str(os.cpu_count()),
        'python': platform.python_version(),
        'hosts': '800 (HP ML110 G4 / G5 alternating)',
        'process max RSS': f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB',
        'load average at the end': ' '.join(f'{x:.1f}' for x in os.getloadavg()),
    }
    path = common.write_results(
        'consolidation', 'VM consolidation on PlanetLab traces',
        [(f'{ANCHOR}: ours beside CloudSim 3.0.3', anchor),
         ('Every shared day', every)], facts)
    print(anchor)
    print(f'written to {path}')


if __name__ == '__main__':
    main()
