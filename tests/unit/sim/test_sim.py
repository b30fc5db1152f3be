import io
import json
import os
import contextlib

import numpy as np

from vmcloud.cmd import cli
from vmcloud.scheduler import consolidation
from vmcloud.sim import engine
from vmcloud.sim import errors
from vmcloud.sim import model
from vmcloud.sim import power
from vmcloud.sim import traces
from tests import base

LINEAR = power.SpecPowerModel('linear', tuple(100.0 + 10 * i for i in range(11)))
# one PE of 1000 MIPS; 160 Mbit/s, so a 100 MB VM migrates in 100 / (160000 / 16000) = 10 s
SMALL_HOST = model.HostType('small', 1, 1000, 4096, 160_000, LINEAR)
SMALL_VM = model.VmType('vm', 1000, 100, 0)


def scenario(utilization, hosts=2):
    u = np.asarray(utilization, dtype=float)
    return model.Scenario([SMALL_HOST] * hosts, [SMALL_VM] * len(u), u)


class PowerTest(base.TestCase):
    def test_spec_power_is_linear_between_the_ten_percent_points(self):
        g4 = power.HP_PROLIANT_ML110_G4
        self.assertEqual(86, g4.power(0))
        self.assertEqual(117, g4.power(1))
        self.assertAlmostEqual(92.6 + (96 - 92.6) * 0.5, g4.power(0.25))
        self.assertAlmostEqual(g4.power(0.25), g4.power_array(np.array([0.25]))[0])
        self.assertRaises(ValueError, g4.power, 1.2)


class TracesTest(base.TestCase):
    def test_files_are_read_in_name_order_and_padded(self):
        day = os.path.join(self.tmp, 'day1')
        os.makedirs(day)
        for name, values in (('b', [10, 20]), ('a', [50])):
            with open(os.path.join(day, name), 'w') as f:
                f.write('\n'.join(map(str, values)) + '\n')
        names, data = traces.load_day('day1', self.tmp)
        self.assertEqual(['a', 'b'], names)
        self.assertEqual((2, traces.SAMPLES + 1), data.shape)
        self.assertEqual([0.5, 0.5], list(data[0, :2]))
        self.assertEqual([0.1, 0.2, 0.2], list(data[1, :3]))
        self.assertEqual(['day1'], traces.days(self.tmp))
        self.assertRaises(errors.WorkloadNotFound, traces.load_day, 'nope', self.tmp)

    def test_vm_types_in_four_equal_blocks(self):
        types = model.assign_vm_types(10)
        self.assertEqual([0, 0, 0, 1, 1, 1, 2, 2, 2, 3],
                         [model.VM_TYPES.index(t) for t in types])
        self.assertEqual(['ml110-g4', 'ml110-g5', 'ml110-g4'],
                         [h.name for h in model.alternating_hosts(3)])


class EngineTest(base.TestCase):
    def test_two_hosts_one_migration_by_hand(self):
        # Two VMs at a constant 20% of 1000 MIPS, one per host (PABFD at time 0 fills
        # host 0 with VM 0, full MIPS). Steps at 300.1 and 600.1 (three samples).
        # 300.1: both hosts at 20%, no overload; host 0 is the least loaded: VM 0 moves
        #   to host 1 (40% <= 80%). While it migrates (10 s): host 0 still runs it
        #   (180 MIPS allocated, counted 200), host 1 gets 10% of it: 220 of 400 asked.
        # 310.1: energy 10 s x (120 W + 122 W) = 2420 Ws; active host time 20 s, of which
        #   10 s in violation (host 1); VM MIPS asked 400 x 10, short 20 x 10 = 200.
        #   Host 0 is empty: a shutdown.
        # 600.1: host 1 alone at 40%: 140 W x 290 s = 40600 Ws; 290 s active, no violation;
        #   400 x 290 MIPS asked. Host 1 cannot be emptied (no other host is on).
        # SLATAH = 10 / 310, PDM = 200 / 120000, energy 43020 Ws.
        sc = scenario([[0.2] * 4, [0.2] * 4])
        result = engine.Simulation(sc, consolidation.load('thr-mmt', 0.8), param=0.8).run()
        self.assertEqual(2, result.steps)
        self.assertEqual(1, result.migrations)
        self.assertAlmostEqual(43020 / 3.6e6, result.energy_kwh)
        self.assertAlmostEqual(10 / 310, result.slatah)
        self.assertAlmostEqual(200 / 120000, result.pdm)
        self.assertAlmostEqual(result.slatah * result.pdm, result.slav)
        self.assertAlmostEqual(result.energy_kwh * result.slav, result.esv)
        self.assertEqual(1, result.host_shutdowns)
        self.assertEqual([2, 1], result.series['active_hosts'])

    def test_created_vms_ask_nothing_until_their_workload_starts(self):
        # One host of 2 x 1000 MIPS, five 500 MIPS VMs, LR (THR 0.7 without history).
        # Counting the VMs created before it, the third would take the host to
        # 1500 / 2000 = 0.75 > 0.7; but a created VM asks for nothing until its
        # workload starts (CloudSim: no cloudlet yet), so only the new VM's 500 counts.
        # Their MIPS stay allocated: after four, the fifth finds no room.
        host = model.HostType('two-pe', 2, 1000, 4096, 160_000, LINEAR)
        vm = model.VmType('half', 500, 100, 0)
        sc = model.Scenario([host], [vm] * 5, np.full((5, 4), 0.2))
        sim = engine.Simulation(sc, consolidation.load('lr-mmt', 1.2), param=1.2)
        sim.place_initial()
        self.assertEqual([0, 0, 0, 0, -1], list(sim.cluster.vm_host))

    def test_no_migration_baseline(self):
        # first fit, no consolidation: both hosts on all along at 20%: 120 W each for
        # 300 s (the first interval counts nothing: hosts were not measured before).
        sc = scenario([[0.2] * 4, [0.2] * 4])
        result = engine.Simulation(sc, None).run()
        self.assertEqual(0, result.migrations)
        self.assertAlmostEqual(2 * 120 * 300 / 3.6e6, result.energy_kwh)
        self.assertEqual(0.0, result.slatah)

    def test_overload_sla(self):
        # two VMs of 1000 MIPS on one 1000 MIPS host asking 70% each: without migration
        # the host is oversubscribed all the time (SLATAH 1); the VMs get 500 each.
        sc = scenario([[0.7] * 4, [0.7] * 4], hosts=1)
        sim = engine.Simulation(sc, None)
        sim.place_initial()
        sim.cluster.vm_host[1] = 0              # force both on host 0
        sim.cluster.host_vms[0] = [0, 1]
        sim.placed = np.arange(2)
        sim.all_placed = True
        t = 300.1
        while t <= sim.limit:
            sim._tick(t, step=True)
            t += 300
        self.assertEqual([500.0, 500.0], list(sim.v_alloc))
        self.assertEqual(sim.violation_time, sim.active_time)

    def test_idle_vms_retire(self):
        # VM 1 asks nothing at samples 1 and 2: CloudSim ends its cloudlet at 300.1
        sc = scenario([[0.2] * 4, [0.2, 0, 0, 0.5]])
        sim = engine.Simulation(sc, None)
        sim.run()
        self.assertEqual(1, sim.retired)
        self.assertEqual(-1, sim.cluster.vm_host[1])

    def test_deterministic_for_a_seed(self):
        rng = np.random.default_rng(7)
        u = rng.integers(0, 60, size=(30, 13)) / 100
        hosts = [model.HOST_TYPES[i % 2] for i in range(20)]
        vms = model.assign_vm_types(30)

        def run(seed):
            sc = model.Scenario(hosts, vms, u.copy())
            policy = consolidation.load('thr-rs', 0.7)
            planned = []
            plan = policy.plan
            policy.plan = lambda cluster: planned.append(plan(cluster)) or planned[-1]
            r = engine.Simulation(sc, policy, seed=seed).run()
            return (r.energy_kwh, r.migrations, r.slatah, r.pdm, r.series['active_hosts'],
                    planned)
        first = run(5)
        self.assertGreater(first[1], 0)
        self.assertEqual(first, run(5))
        # RS picks which VM leaves an overloaded host at random: with another seed
        # other VMs move, so a selector that ignored the seed would give one run for all
        others = [run(seed) for seed in (6, 7, 8)]
        self.assertEqual(4, len({repr(r) for r in [first] + others}))


class CliTest(base.TestCase):
    def _traces(self):
        day = os.path.join(self.tmp, 'traces', '20990101')
        os.makedirs(day)
        for i in range(8):
            with open(os.path.join(day, f'vm{i}'), 'w') as f:
                f.write('\n'.join(str((i * 7 + k * 3) % 60 + 1) for k in range(288)))
        return os.path.join(self.tmp, 'traces')

    def _run(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def test_simulate_json_and_plot(self):
        plot = os.path.join(self.tmp, 'run.svg')
        rc, out, _ = self._run('simulate', '--workload', '20990101', '--hosts', '10',
                               '--policy', 'lr-mmt', '--param', '1.2', '--traces',
                               self._traces(), '-f', 'json', '--plot', plot)
        self.assertEqual(0, rc)
        record = json.loads(out)
        self.assertEqual('lr-mmt', record['policy'])
        self.assertEqual(8, record['vms'])
        self.assertGreater(record['energy_kwh'], 0)
        with open(plot) as f:
            self.assertIn('<svg', f.read())

    def test_unknown_day_and_policy_exit_1(self):
        traces_dir = self._traces()
        rc, _, err = self._run('simulate', '--workload', 'nope', '--traces', traces_dir)
        self.assertEqual(1, rc)
        self.assertIn('20990101', err)
        rc, _, err = self._run('simulate', '--workload', '20990101', '--policy', 'zz-mmt',
                               '--traces', traces_dir)
        self.assertEqual(1, rc)
        self.assertIn('unknown policy', err)
