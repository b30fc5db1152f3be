"""How busy this host's CPUs are: what each heartbeat reports for the gateway to weigh
its instances by.

Two sources. ``/proc/stat`` (the default) measures the whole machine: the kernel's
count of the time every CPU spent idle against the time that passed. A cgroup v2
directory (``[compute] load_cgroup``) measures only the processes in it: its
``cpu.stat`` ``usage_usec`` against wall time x CPUs. Hosts that share one kernel
(containers, the multi-host test harness's namespaces) each put their processes in a
cgroup of their own, so that each measures its own load and not its neighbours'.
(``usage_usec`` is kept for every cgroup v2 directory, whether or not the cpu
controller is enabled for it.)
"""
import os
import time
from typing import Callable

from oslo_config import cfg

from vmcloud import exception

PROC_STAT = '/proc/stat'
CPU_STAT = 'cpu.stat'
# /proc/stat's aggregate line: user nice system idle iowait irq softirq steal guest
# guest_nice. Time waiting for I/O is idle CPU; guest time is already counted in user
# and nice, so it is left out of the total.
_IDLE_FIELDS = (3, 4)
_COUNTED_FIELDS = 8


def cpu_count(configured: int = 0) -> int:
    """The logical CPUs to report: ``configured`` (``[compute] load_cpus``) unless 0."""
    return configured or os.cpu_count() or 1


def _read(path: str) -> str:
    """:raises: ConfigError naming ``path`` if it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise exception.ConfigError(f'cannot read the CPU load from {path}: {exc}') from exc


def _proc_stat_jiffies(path: str) -> tuple[int, int]:
    """(busy, total) time of every CPU since boot, in the kernel's clock ticks.

    :raises: ConfigError naming ``path`` if it cannot be read or has no aggregate
        ``cpu`` line.
    """
    for line in _read(path).splitlines():
        fields = line.split()
        if fields and fields[0] == 'cpu':
            try:
                counts = [int(v) for v in fields[1:_COUNTED_FIELDS + 1]]
            except ValueError:
                break
            if len(counts) <= max(_IDLE_FIELDS):
                break
            total = sum(counts)
            return total - sum(counts[i] for i in _IDLE_FIELDS), total
    raise exception.ConfigError(f'{path} has no aggregate "cpu" line of CPU times')


def _cgroup_usage_usec(path: str) -> int:
    """CPU time used by the cgroup's processes, in microseconds.

    :raises: ConfigError naming ``path`` if it cannot be read or has no usage_usec.
    """
    for line in _read(path).splitlines():
        key, _, value = line.partition(' ')
        if key == 'usage_usec':
            try:
                return int(value)
            except ValueError:
                break
    raise exception.ConfigError(f'{path} has no usage_usec line: is it the cpu.stat of '
                                f'a cgroup v2 directory?')


class CpuSampler:
    """The fraction of the host's CPUs busy between two calls of ``busy()``.

    ``source`` is a file in the format of ``/proc/stat`` or a cgroup v2 directory.
    ``clock`` (seconds, monotonic) times a cgroup's usage; tests pass their own.

    :raises: ConfigError naming the file if ``source`` cannot be read or is neither.
    """

    def __init__(self, source: str = PROC_STAT, cpus: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.cpus = cpu_count(cpus)
        self._clock = clock
        self._cgroup = os.path.isdir(source)
        self._path = os.path.join(source, CPU_STAT) if self._cgroup else source
        # Returned when no time passed since the last call: a fraction of nothing.
        self._last = 0.0
        # The first call measures from here.
        self._busy, self._total = self._sample()

    def _sample(self) -> tuple[float, float]:
        """(busy, total) CPU time so far, in a unit of the source's own."""
        if self._cgroup:
            usage = _cgroup_usage_usec(self._path) / 1e6
            return usage, self._clock() * self.cpus
        return _proc_stat_jiffies(self._path)

    def busy(self) -> float:
        """The fraction (0..1) of the CPUs busy since the previous call (or since the
        sampler was made).

        :raises: ConfigError naming the file if it can no longer be read.
        """
        busy, total = self._sample()
        elapsed = total - self._total
        if elapsed > 0:
            # Clamped: a cgroup's usage and the clock are read at two moments, so a
            # short interval of full load can come out a little above 1.
            self._last = min(1.0, max(0.0, (busy - self._busy) / elapsed))
            self._busy, self._total = busy, total
        return self._last


def sampler(conf: cfg.ConfigOpts) -> CpuSampler:
    """The sampler ``[compute] load_cgroup`` and ``load_cpus`` configure.

    :raises: ConfigError naming the directory or file if the source cannot be read.
    """
    options = conf.compute
    if options.load_cgroup and not os.path.isdir(options.load_cgroup):
        # Else it would be read as a file of /proc/stat's format, and the error would
        # not say that a cgroup was meant.
        raise exception.ConfigError(f'[compute] load_cgroup {options.load_cgroup} is not '
                                    f'a directory: name a cgroup v2 directory, or leave '
                                    f'it empty to measure the whole machine')
    return CpuSampler(options.load_cgroup or PROC_STAT, options.load_cpus)
