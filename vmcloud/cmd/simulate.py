"""``vmcloud simulate``: run a consolidation policy over a day of PlanetLab traces."""
import argparse
import sys

from oslo_config import cfg

from vmcloud.cmd import output
from vmcloud.sim import engine
from vmcloud.sim import plot

COLUMNS = ('workload', 'policy', 'param', 'hosts', 'vms', 'energy_kwh', 'migrations', 'slatah',
           'pdm', 'slav', 'esv', 'host_shutdowns', 'wall_seconds')


def do_simulate(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    bar = output.ProgressBar(f'simulating {args.workload}', unit='steps', enabled=args.progress)
    try:
        result = engine.simulate(args.workload, args.policy, args.param, hosts=args.hosts,
                                 seed=args.seed, path=args.traces, progress=bar)
    finally:
        bar.close()
    record = result.summary()
    if args.fmt == 'table':
        for key in ('slatah', 'pdm', 'sla_overall'):
            record[key] = f'{record[key] * 100:.4f}%'
        for key in ('slav', 'esv'):
            record[key] = f'{record[key]:.3e}'
    if args.plot:
        with open(args.plot, 'w') as f:
            f.write(plot.svg(result))
        record['plot'] = args.plot
    output.emit_record(record, args.fmt, sys.stdout)
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    sub = groups.add_parser(
        'simulate', help='simulate VM consolidation on a day of PlanetLab traces')
    sub.set_defaults(handler=do_simulate)
    sub.add_argument('--workload', required=True, metavar='DAY',
                     help='trace day, a folder of the PlanetLab data (e.g. 20110303)')
    sub.add_argument('--hosts', type=int, default=800, help='number of hosts (G4/G5 alternating)')
    sub.add_argument('--policy', default='lr-mmt',
                     help='DETECTOR-SELECTOR (thr|iqr|mad|lr|lrr - mmt|mc|mu|rs), or none')
    sub.add_argument('--param', type=float, default=None,
                     help='the detector\'s threshold or safety parameter')
    sub.add_argument('--seed', type=int, default=0, help='seed of random VM selection (rs)')
    sub.add_argument('--traces', metavar='DIR', default=None,
                     help='folder of trace days (default: ../shared/data/planetlab)')
    sub.add_argument('--plot', metavar='FILE', help='write an SVG of active hosts and SLA')
    sub.add_argument('-f', dest='fmt', choices=('table', 'json'), default='table',
                     help='output format')
    sub.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                     help='show a progress bar (default: when stderr is a terminal)')
