"""Shared pieces of the benchmark scripts: fair timing, machine facts, result tables.

Every number a benchmark reports is a ratio against a baseline measured side by
side in the same run; absolute times are printed only to make the ratios checkable.
"""
import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, 'doc', 'benchmarks')


def drop_caches() -> bool:
    """Write back and drop the page cache so every contender starts cold; False if not allowed."""
    os.sync()
    try:
        with open('/proc/sys/vm/drop_caches', 'w') as f:
            f.write('3\n')
        return True
    except OSError:
        return False


def rotate(names: Sequence[str], repeat: int, run: Callable[[str], float]) -> dict[str, list]:
    """``run(name)`` for every name in each of ``repeat`` rounds; each round starts one
    name later, so no contender always goes first. :returns: name -> what each run returned."""
    results: dict[str, list] = {name: [] for name in names}
    for round_number in range(repeat):
        shift = round_number % len(names)
        for name in list(names[shift:]) + list(names[:shift]):
            results[name].append(run(name))
    return results


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def measure(contenders: dict[str, Callable[[], None]], repeat: int = 3,
            prepare: Callable[[], None] | None = None) -> dict[str, float]:
    """Median wall time of each contender, run in rotating order, caches dropped before each.

    Every contender's time includes a final sync(), so a contender that leaves its
    output in the page cache pays for it like one that fsyncs.
    """
    def run(name: str) -> float:
        if prepare is not None:
            prepare()
        drop_caches()

        def work_and_sync() -> None:
            contenders[name]()
            os.sync()
        return timed(work_and_sync)

    times = rotate(list(contenders), repeat, run)
    return {name: statistics.median(values) for name, values in times.items()}


@contextlib.contextmanager
def scratch_state(conf):
    """vmcloud configured from no files, its state_path a fresh directory under .cache.

    :returns: (as a context) the directory, removed afterwards.
    """
    conf([], project='vmcloud', default_config_files=[])
    root = tempfile.mkdtemp(dir=os.path.join(REPO, '.cache'))
    conf.set_override('state_path', root)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def nested_state(conf, root: str):
    """A fresh state_path inside ``root`` for one contender; ``root`` again afterwards."""
    work = tempfile.mkdtemp(dir=root)
    conf.set_override('state_path', work)
    try:
        yield work
    finally:
        conf.set_override('state_path', root)
        shutil.rmtree(work, ignore_errors=True)


def size_arguments(description: str,
                   more: Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> argparse.Namespace:
    """--size MIB, --repeat N, --quick (128 MiB, one run) and --workdir, and those
    ``more`` adds, parsed."""
    parser = argparse.ArgumentParser(description=description)
    if more is not None:
        more(parser)
    parser.add_argument('--size', type=int, default=1024, help='image size in MiB')
    parser.add_argument('--repeat', type=int, default=3, help='runs per contender (median)')
    parser.add_argument('--quick', action='store_true', help='128 MiB, one run each')
    parser.add_argument('--workdir', default=os.path.join(REPO, '.cache', 'bench'))
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeat = 128, 1
    os.makedirs(args.workdir, exist_ok=True)
    return args


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)


def machine() -> dict[str, str]:
    qemu = subprocess.run(['qemu-img', '--version'], capture_output=True, text=True)
    return {
        'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        'cpus': str(os.cpu_count()),
        'python': platform.python_version(),
        'kernel': platform.release(),
        'qemu-img': qemu.stdout.splitlines()[0] if qemu.returncode == 0 else 'missing',
        'page cache dropped between runs': 'yes' if drop_caches() else 'no (not permitted)',
    }


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table, which also reads well on a terminal."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values):
        return '| ' + ' | '.join(v.ljust(w) for v, w in zip(values, widths)) + ' |'
    return '\n'.join([line(columns), line(['-' * w for w in widths])] + [line(r) for r in cells])


def write_results(name: str, title: str, sections: Sequence[tuple[str, str]],
                  facts: dict[str, str]) -> str:
    """Write doc/benchmarks/NAME.md: the machine facts, then each (heading, body) section."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f'{name}.md')
    with open(path, 'w') as f:
        f.write(f'# {title}\n\nWritten by `benchmarks/{name}.py`.\n\n')
        f.write(table(('fact', 'value'), list(facts.items())) + '\n')
        for heading, body in sections:
            f.write(f'\n## {heading}\n\n{body}\n')
    return path


def mib(n: float) -> str:
    return f'{n / 1024 ** 2:.1f} MiB'
