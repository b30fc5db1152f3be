"""The CPU load a compute host reports: /proc/stat's format, a cgroup's cpu.stat (fake
ones written by the test, with a clock of the test's), the real /proc/stat, and a real
cgroup v2 directory holding a process that spins."""
import os
import subprocess
import sys
import time
import uuid

from vmcloud import exception
from vmcloud.compute import load
from tests import base

# user nice system idle iowait irq softirq steal guest guest_nice
PROC_STAT = 'cpu  {} 0 {} {} {} 0 0 0 {} 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 12345\n'
# Spins until this process used SECONDS of CPU time, after moving itself into a cgroup.
SPIN = '''
import os, sys, time
with open(sys.argv[1], 'w') as f:
    f.write(str(os.getpid()))
while time.process_time() < float(sys.argv[2]):
    pass
'''


class Clock:
    """Monotonic seconds that move only when the test says."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: str, text: str) -> None:
    with open(path, 'w') as f:
        f.write(text)


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified
    on a hybrid host), None if nowhere."""
    with open('/proc/self/mounts') as f:
        for line in f:
            _source, target, fstype, *_ = line.split()
            if fstype == 'cgroup2':
                return target
    return None


class ProcStatTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.tmp, 'stat')

    def stat(self, user: int, system: int, idle: int, iowait: int, guest: int = 0) -> None:
        write(self.path, PROC_STAT.format(user, system, idle, iowait, guest))

    def test_first_call_measures_since_creation(self):
        self.stat(user=100, system=100, idle=800, iowait=0)
        sampler = load.CpuSampler(self.path)
        self.stat(user=160, system=140, idle=900, iowait=0)
        # 100 ticks busy of 200.
        self.assertEqual(0.5, sampler.busy())

    def test_each_call_measures_since_the_one_before(self):
        self.stat(user=0, system=0, idle=0, iowait=0)
        sampler = load.CpuSampler(self.path)
        self.stat(user=100, system=0, idle=100, iowait=0)
        self.assertEqual(0.5, sampler.busy())
        self.stat(user=100, system=0, idle=400, iowait=0)
        self.assertEqual(0.0, sampler.busy())
        self.stat(user=400, system=100, idle=400, iowait=0)
        self.assertEqual(1.0, sampler.busy())

    def test_waiting_for_io_is_idle_and_guest_time_is_not_counted_twice(self):
        self.stat(user=100, system=100, idle=800, iowait=0)
        sampler = load.CpuSampler(self.path)
        # Guest time is part of user time already: 100 busy ticks of 300, not 150 of 350.
        self.stat(user=150, system=150, idle=900, iowait=100, guest=50)
        self.assertAlmostEqual(1 / 3, sampler.busy())

    def test_no_time_passed_repeats_the_last_figure(self):
        self.stat(user=0, system=0, idle=0, iowait=0)
        sampler = load.CpuSampler(self.path)
        self.assertEqual(0.0, sampler.busy())
        self.stat(user=30, system=0, idle=10, iowait=0)
        self.assertEqual(0.75, sampler.busy())
        self.assertEqual(0.75, sampler.busy())

    def test_a_file_without_the_cpu_line_is_refused_naming_it(self):
        write(self.path, 'cpu0 1 2 3 4 5 6 7 8\nintr 1\n')
        error = self.assertRaises(exception.ConfigError, load.CpuSampler, self.path)
        self.assertIn(self.path, str(error))

    def test_a_missing_file_is_refused_naming_it(self):
        missing = os.path.join(self.tmp, 'no-such-stat')
        error = self.assertRaises(exception.ConfigError, load.CpuSampler, missing)
        self.assertIn(missing, str(error))
        self.assertIsInstance(error.__cause__, FileNotFoundError)

    def test_the_real_proc_stat_sees_this_process_spin(self):
        sampler = load.CpuSampler()
        spun = time.process_time() + 0.3
        while time.process_time() < spun:
            pass
        busy = sampler.busy()
        self.assertGreater(busy, 0.0)
        self.assertLessEqual(busy, 1.0)

    def test_cpus_are_the_machine_s_unless_configured(self):
        self.assertEqual(os.cpu_count(), load.CpuSampler().cpus)
        self.assertEqual(3, load.CpuSampler(cpus=3).cpus)


class FakeCgroupTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.cgroup = os.path.join(self.tmp, 'host1')
        os.mkdir(self.cgroup)
        self.clock = Clock()

    def usage(self, usec: int) -> None:
        write(os.path.join(self.cgroup, 'cpu.stat'),
              f'usage_usec {usec}\nuser_usec {usec // 2}\nsystem_usec {usec // 2}\n'
              'nice_usec 0\n')

    def test_usage_against_wall_time_times_cpus(self):
        self.usage(1_000_000)
        sampler = load.CpuSampler(self.cgroup, cpus=2, clock=self.clock)
        self.usage(4_000_000)
        self.clock.now += 2
        # 3 s of CPU in 2 s of 2 CPUs.
        self.assertEqual(0.75, sampler.busy())
        self.clock.now += 5
        self.assertEqual(0.0, sampler.busy())

    def test_a_reading_above_full_load_is_full_load(self):
        self.usage(0)
        sampler = load.CpuSampler(self.cgroup, cpus=1, clock=self.clock)
        self.usage(1_100_000)
        self.clock.now += 1
        self.assertEqual(1.0, sampler.busy())

    def test_no_time_passed_repeats_the_last_figure(self):
        self.usage(0)
        sampler = load.CpuSampler(self.cgroup, cpus=1, clock=self.clock)
        self.usage(250_000)
        self.clock.now += 1
        self.assertEqual(0.25, sampler.busy())
        self.assertEqual(0.25, sampler.busy())

    def test_a_directory_without_cpu_stat_is_refused_naming_the_file(self):
        error = self.assertRaises(exception.ConfigError, load.CpuSampler, self.cgroup)
        self.assertIn(os.path.join(self.cgroup, 'cpu.stat'), str(error))

    def test_a_cpu_stat_without_usage_is_refused_naming_it(self):
        write(os.path.join(self.cgroup, 'cpu.stat'), 'user_usec 1\n')
        error = self.assertRaises(exception.ConfigError, load.CpuSampler, self.cgroup)
        self.assertIn(os.path.join(self.cgroup, 'cpu.stat'), str(error))
        self.assertIn('usage_usec', str(error))

    def test_a_cgroup_removed_later_is_an_error_naming_the_file(self):
        self.usage(0)
        sampler = load.CpuSampler(self.cgroup, cpus=1, clock=self.clock)
        os.remove(os.path.join(self.cgroup, 'cpu.stat'))
        error = self.assertRaises(exception.ConfigError, sampler.busy)
        self.assertIn(os.path.join(self.cgroup, 'cpu.stat'), str(error))

    def test_the_options_choose_the_cgroup_and_the_cpus(self):
        self.usage(0)
        self.conf.set_override('load_cgroup', self.cgroup, 'compute')
        self.conf.set_override('load_cpus', 6, 'compute')
        sampler = load.sampler(self.conf)
        self.assertEqual((self.cgroup, 6), (sampler.source, sampler.cpus))
        self.conf.clear_override('load_cgroup', 'compute')
        self.assertEqual(load.PROC_STAT, load.sampler(self.conf).source)

    def test_a_configured_cgroup_that_is_no_directory_is_refused_naming_the_option(self):
        self.conf.set_override('load_cgroup', os.path.join(self.tmp, 'nowhere'), 'compute')
        error = self.assertRaises(exception.ConfigError, load.sampler, self.conf)
        self.assertIn('[compute] load_cgroup', str(error))
        self.assertIn(os.path.join(self.tmp, 'nowhere'), str(error))


class RealCgroupTest(base.TestCase):
    """A process in a child cgroup is what the cgroup's sampler measures. (cpu.stat's
    usage_usec is kept by the cgroup core: the cpu controller need not be enabled.)"""

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.fail('the real cgroup test needs root (it makes a cgroup); run it as '
                      'root like the README\'s test command')
        mount = cgroup2_mount()
        if mount is None:
            self.fail('no cgroup v2 hierarchy is mounted (see /proc/self/mounts)')
        self.cgroup = os.path.join(mount, f'vmcloud-test-{uuid.uuid4().hex[:12]}')
        os.mkdir(self.cgroup)
        self.addCleanup(os.rmdir, self.cgroup)

    def test_a_spinning_process_in_the_cgroup_is_its_load(self):
        sampler = load.CpuSampler(self.cgroup, cpus=1)
        before = load._cgroup_usage_usec(os.path.join(self.cgroup, 'cpu.stat'))
        spinner = subprocess.Popen(
            [sys.executable, '-c', SPIN, os.path.join(self.cgroup, 'cgroup.procs'), '1.0'])
        self.addCleanup(base.stop_process, spinner)
        self.assertEqual(0, spinner.wait(60))
        after = load._cgroup_usage_usec(os.path.join(self.cgroup, 'cpu.stat'))
        # Its second of CPU time is the cgroup's (and the start before it moved is not).
        self.assertGreaterEqual(after - before, 900_000)
        self.assertGreater(sampler.busy(), 0.3)
