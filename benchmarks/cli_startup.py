"""How long the ``vmcloud`` command takes to start, against the same command with every
subcommand module imported up front (what it did before its commands became lazy).

    .venv/bin/python benchmarks/cli_startup.py [--repeat N]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from vmcloud.cmd import cli  # noqa: E402

# The baseline: the same main(), after importing what the eager command imported.
EAGER = ('import sys\n'
         + ''.join(f'import {module}\n' for module in sorted({m for m, _ in cli.COMMANDS.values()}))
         + 'from vmcloud.cmd import cli\n'
         + 'sys.exit(cli.main(sys.argv[1:]))\n')
LAZY = 'import sys\nfrom vmcloud.cmd import cli\nsys.exit(cli.main(sys.argv[1:]))\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=7, help='runs per contender (median)')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        config = os.path.join(state, 'vmcloud.conf')
        with open(config, 'w') as f:
            f.write(f'[DEFAULT]\nstate_path = {state}\n')
        commands = {'--help': ['--help'],
                    'image list': ['--config-file', config, 'image', 'list']}
        rows = []
        for label, argv in commands.items():
            def run(name: str) -> float:
                script = LAZY if name == 'lazy' else EAGER
                return common.timed(lambda: subprocess.run(
                    [sys.executable, '-c', script, *argv], check=True, capture_output=True,
                    cwd=common.REPO))
            times = common.rotate(['lazy', 'eager'], args.repeat, run)
            lazy, eager = (statistics.median(times[n]) for n in ('lazy', 'eager'))
            rows.append((f'vmcloud {label}', f'{lazy:.3f} s', f'{eager:.3f} s',
                         f'{eager / lazy:.1f}x'))
    body = common.table(('command', 'lazy (now)', 'every module imported', 'faster'), rows)
    print(body)
    path = common.write_results(
        'cli_startup', 'vmcloud command start-up',
        [(f'Median of {args.repeat} runs each, in rotating order', body)], common.machine())
    print(f'written to {path}')


if __name__ == '__main__':
    main()
