"""PlanetLab CPU traces: one file per VM, one percentage per line, a sample every 300 s."""
import os

import numpy as np

from vmcloud.sim import errors

SAMPLE_INTERVAL = 300.0
SAMPLES = 288

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_ROOT = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'planetlab')


def root() -> str:
    """Where the day folders are: $VMCLOUD_PLANETLAB or ../shared/data/planetlab of the checkout."""
    return os.environ.get('VMCLOUD_PLANETLAB', DEFAULT_ROOT)


def days(path: str | None = None) -> list[str]:
    """The day folders available, sorted."""
    base = path or root()
    if not os.path.isdir(base):
        return []
    return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))


def load_day(day: str, path: str | None = None) -> tuple[list[str], np.ndarray]:
    """File names (sorted) and utilisation fractions of one day, shape (VMs, SAMPLES + 1).

    The extra last column repeats the last sample, so a demand between the last
    sample and the end of the day can be interpolated.

    :raises: WorkloadNotFound naming the day and the days that exist.
    """
    base = path or root()
    folder = os.path.join(base, day)
    if not day or os.sep in day or not os.path.isdir(folder):
        raise errors.WorkloadNotFound(
            f'no PlanetLab workload {day!r} in {base}; '
            f'available: {", ".join(days(base)) or "none"}')
    names = sorted(os.listdir(folder))
    return names, load_files([os.path.join(folder, n) for n in names])


def load_files(paths: list[str]) -> np.ndarray:
    """Utilisation fractions of trace files (percent, one a line), padded as load_day does."""
    data = np.zeros((len(paths), SAMPLES + 1))
    for i, p in enumerate(paths):
        with open(p) as f:
            values = [int(line) for line in f.read().split()[:SAMPLES]]
        data[i, :len(values)] = values
        if values:
            data[i, len(values):] = values[-1]
    data /= 100.0
    return data
