"""The driver interface itself: a driver written from it alone, options, thread safety."""
import os
import sys
import threading

import fixtures

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from vmcloud.drivers import console
from vmcloud.drivers import fake
from vmcloud.drivers import mips
from vmcloud.drivers import sim
from vmcloud.sim import model
from tests import base

Capability = driver_base.Capability


class MinimalDriver(driver_base.Driver):
    """Only what the interface requires: a hypervisor that can start and kill."""

    capabilities = Capability.FILE_DISK

    def __init__(self, conf):
        super().__init__(conf)
        self.states: dict[str, driver_base.PowerState] = {}

    def _state(self, name):
        try:
            return self.states[name]
        except KeyError:
            raise exception.InstanceNotFound(name) from None

    def spawn(self, spec):
        self.validate(spec)
        self.states[spec.name] = driver_base.PowerState.RUNNING

    def list_instances(self):
        return sorted(self.states)

    def power_state(self, name):
        return self._state(name)

    def stop(self, name, timeout=None):
        self._state(name)
        self.states[name] = driver_base.PowerState.SHUTDOWN
        return True

    def destroy(self, name):
        self._state(name)
        del self.states[name]


class ConsoleDriver(MinimalDriver):
    """A console, and so phase events from the default wait_for_event."""

    capabilities = Capability.FILE_DISK | Capability.CONSOLE_LOG | Capability.PHASE_EVENTS

    def __init__(self, conf):
        super().__init__(conf)
        self.consoles: dict[str, str] = {}

    def console_log(self, name):
        self._state(name)
        return self.consoles.get(name, '')


class InterfaceDefaultsTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.disk = os.path.join(self.tmp, 'disk.raw')
        open(self.disk, 'wb').close()

    def spec(self, **kw):
        kw.setdefault('disk', self.disk)
        return driver_base.InstanceSpec(name='vm1', **kw)

    def test_a_driver_from_the_required_methods_alone(self):
        driver = MinimalDriver(self.conf)
        self.assertEqual('minimal', driver.name)
        driver.spawn(self.spec())
        self.assertEqual('', driver.console_log('vm1'))
        self.assertRaises(exception.InstanceNotFound, driver.console_log, 'vm2')
        for call in (driver.pause, driver.resume, driver.freeze_io, driver.thaw_io):
            error = self.assertRaises(exception.NotSupported, call, 'vm1')
            self.assertIn('the minimal driver cannot', str(error))
            self.assertEqual(driver_base.PowerState.RUNNING, driver.power_state('vm1'))
        self.assertRaises(exception.NotSupported, driver.wait_for_event, 'vm1', 'boot-done', 1)
        for call in (driver.pause, driver.resume, driver.freeze_io, driver.thaw_io):
            self.assertRaises(exception.InstanceNotFound, call, 'vm2')
        self.assertGreater(driver.host_capacity().cpus, 0)

    def test_boot_without_phase_events_is_refused_and_leaves_nothing(self):
        driver = MinimalDriver(self.conf)
        self.assertRaises(exception.NotSupported, driver.boot, self.spec(), 1)
        self.assertEqual([], driver.list_instances())

    def test_boot_keeps_its_reason_when_the_destroy_after_it_fails(self):
        class NoDestroy(ConsoleDriver):
            def destroy(self, name):
                raise exception.DriverError(f'cannot destroy {name}')

        driver = NoDestroy(self.conf)
        logged = self.useFixture(fixtures.FakeLogger())
        error = self.assertRaises(exception.GuestTimeout, driver.boot, self.spec(), 0)
        self.assertIn('vm1 did not reach boot-done', str(error))
        self.assertIsNone(error.__context__)
        self.assertIn('destroying vm1 after it did not reach boot-done failed: cannot '
                      'destroy vm1', logged.output)

    def test_capabilities_are_checked_by_validate(self):
        driver = MinimalDriver(self.conf)
        error = self.assertRaises(exception.InvalidSpec, driver.validate,
                                  self.spec(disk='nbd://h/e'))
        self.assertIn('cannot boot from an NBD URI', str(error))
        error = self.assertRaises(exception.InvalidSpec, driver.validate,
                                  self.spec(kernel=self.disk))
        self.assertIn('cannot boot a kernel directly', str(error))
        self.assertEqual('vm1', error.name)

    def test_nics_need_the_capability(self):
        driver = MinimalDriver(self.conf)
        error = self.assertRaises(exception.InvalidSpec, driver.validate, self.spec(
            nics=(driver_base.Nic('52:54:00:00:00:01', 'lo'),)))
        self.assertIn('the minimal driver cannot attach NICs', str(error))
        error = self.assertRaises(exception.InvalidSpec, driver.validate, self.spec(
            nics=[driver_base.Nic('52:54:00:00:00:01', 'lo')]))
        self.assertIn('nics must be a tuple of Nic, not list', str(error))

    def test_check_mac(self):
        for good in ('52:54:00:ab:CD:ef', '02:00:00:00:00:00', 'fe:ff:ff:ff:ff:ff'):
            self.assertIsNone(driver_base.check_mac(good))
        for bad, words in (('01:00:5e:00:00:01', 'multicast'), ('ff:ff:ff:ff:ff:ff', 'multicast'),
                           ('00:16:3e:00:00:01', 'not locally administered'),
                           ('52:54:00:00:00:001', 'not six hex bytes'),
                           (None, 'not six hex bytes')):
            self.assertIn(words, driver_base.check_mac(bad))

    def test_default_wait_for_event_reads_the_console(self):
        driver = ConsoleDriver(self.conf)
        driver.spawn(self.spec())
        driver.consoles['vm1'] = f'noise\n{console.MARKER} boot-done\n'
        driver.wait_for_event('vm1', 'boot-done', 5)
        driver.stop('vm1')
        error = self.assertRaises(exception.GuestTimeout, driver.wait_for_event, 'vm1',
                                  'app-running', 30)
        self.assertIn('vm1 did not reach app-running: the guest stopped first', str(error))
        self.assertRaises(exception.InstanceNotFound, driver.wait_for_event, 'vm2', 'x', 1)


class DriverOptionsTest(base.TestCase):
    def _load(self, name, config: str):
        path = os.path.join(self.tmp, 'vmcloud.conf')
        with open(path, 'w') as f:
            f.write(config)
        self.conf(['--config-file', path])
        return driver_base.load(self.conf, name)

    def test_moved_options_keep_their_old_names(self):
        driver = self._load('qemu', '[compute]\nqemu_binary = /opt/qemu\n')
        self.assertEqual('/opt/qemu', driver.conf.qemu.binary)
        driver = self._load('libvirt', '[compute]\nlibvirt_uri = qemu:///session\n'
                                       'libvirt_dac_label = 1:1\nqemu_binary = /opt/q\n')
        self.assertEqual('qemu:///session', driver.conf.libvirt.uri)
        self.assertEqual('1:1', driver.conf.libvirt.dac_label)
        self.assertEqual('/opt/q', driver.conf.libvirt.qemu_binary)

    def test_new_names_win(self):
        driver = self._load('qemu', '[compute]\nqemu_binary = /old\n[qemu]\nbinary = /new\n')
        self.assertEqual('/new', driver.conf.qemu.binary)

    def test_every_driver_option_reaches_genconfig(self):
        from vmcloud.conf import opts
        listed = {getattr(group, 'name', group): {o.name for o in options}
                  for group, options in opts.list_opts()}
        self.assertEqual({'binary'}, listed['qemu'])
        self.assertEqual({'uri', 'dac_label', 'qemu_binary'}, listed['libvirt'])
        self.assertIn('host_pe_mips', listed['sim'])
        self.assertNotIn('qemu_binary', listed['compute'])

    def test_the_sim_node_from_its_options(self):
        driver = self._load('sim', '[sim]\nhost_pes = 4\nhost_pe_mips = 1000\n'
                                   'host_ram_mb = 8192\n')
        self.assertEqual(mips.MipsHost('ml110-g5', 4, 1000.0, 8192), driver.host)
        self.assertEqual(4000, driver.host_capacity().mips)


class SimDriverTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.driver = driver_base.load(self.conf, 'sim')
        self.disk = os.path.join(self.tmp, 'disk.raw')
        open(self.disk, 'wb').close()

    def spec(self, name='vm1', mips_flag='', **kw):
        return driver_base.InstanceSpec(name=name, disk=self.disk, cmdline=mips_flag, **kw)

    def test_the_default_host_is_the_simulators_ml110_g5(self):
        g5 = model.HOST_TYPES[1]
        self.assertIsInstance(g5, mips.MipsHost)
        self.assertEqual((g5.name, g5.pes, g5.pe_mips, g5.ram_mb),
                         (self.driver.host.name, self.driver.host.pes,
                          self.driver.host.pe_mips, self.driver.host.ram_mb))

    def test_an_instance_larger_than_the_host_is_an_invalid_spec(self):
        for spec, words in ((self.spec(mips_flag='mips=3000'), '1 x 3000 MIPS'),
                            (self.spec(vcpus=3), '3 x 500 MIPS'),
                            (self.spec(memory_mib=5000), '5000 MiB'),
                            (self.spec(mips_flag='mips=.'), 'mips=. is not a positive'),
                            (self.spec(mips_flag='mips=0'), 'mips=0 is not a positive')):
            error = self.assertRaises(exception.InvalidSpec, self.driver.spawn, spec)
            self.assertIn(words, str(error))
        self.assertEqual([], self.driver.list_instances())

    def test_what_does_not_fit_now_fails_to_spawn(self):
        self.driver.spawn(self.spec('a', 'mips=2000', vcpus=2))
        error = self.assertRaises(exception.SpawnFailed, self.driver.spawn,
                                  self.spec('b', 'mips=1000', vcpus=2))
        self.assertIn('1320 of 5320 MIPS free', str(error))
        self.driver.stop('a')
        self.driver.spawn(self.spec('b', 'mips=1000', vcpus=2))   # a gave its share back
        self.assertEqual((2000.0, 256), self.driver.used())


class FakeNetworkTest(base.TestCase):
    """The fake's Ethernet segments and its answers to the test guest's probes."""

    def setUp(self):
        super().setUp()
        self.driver = fake.FakeDriver(self.conf)
        self.driver.add_bridge('br1')
        self.disk = os.path.join(self.tmp, 'disk.raw')
        open(self.disk, 'wb').close()
        self.macs = iter(f'52:54:00:00:00:{i:02x}' for i in range(1, 256))

    def spawn(self, name, bridge='br1', **flags):
        cmdline = ' '.join([f'vmcloud.id={name}'] + [f'vmcloud.{k}={v}' for k, v in flags.items()])
        nics = (driver_base.Nic(next(self.macs), bridge),) if bridge else ()
        self.driver.spawn(driver_base.InstanceSpec(name=name, disk=self.disk, cmdline=cmdline,
                                                   nics=nics))

    def test_only_running_guests_with_that_address_and_port_answer(self):
        self.spawn('a', ip='10.0.0.2/24')
        self.spawn('b', ip='10.0.0.3/24')
        self.spawn('c', ip='10.0.0.4/24', http='0')
        self.spawn('d', ip='10.0.0.5/24', http_port='8080')
        self.assertEqual('b 1', self.driver.reach('a', '10.0.0.3'))
        self.assertEqual('b 2', self.driver.reach('a', '10.0.0.3'))   # it counts requests
        self.assertEqual('a 1', self.driver.reach('a', '10.0.0.2'))   # itself
        self.assertIsNone(self.driver.reach('a', '10.0.0.4'))         # no server
        self.assertIsNone(self.driver.reach('a', '10.0.0.5'))
        self.assertEqual('d 1', self.driver.reach('a', '10.0.0.5', 8080))
        self.assertIsNone(self.driver.reach('a', '10.0.0.9'))
        self.driver.pause('b')
        self.assertIsNone(self.driver.reach('a', '10.0.0.3'))
        self.driver.resume('b')
        self.driver.stop('b')
        self.assertIsNone(self.driver.reach('a', '10.0.0.3'))
        self.driver.pause('a')
        self.assertIsNone(self.driver.reach('a', '10.0.0.5', 8080))    # a paused prober
        self.assertRaises(exception.InstanceNotFound, self.driver.reach, 'x', '10.0.0.2')

    def test_reach_rounds_are_bounded_and_a_guest_without_nic_reaches_nobody(self):
        self.spawn('a', ip='10.0.0.2/24')
        self.spawn('lonely', bridge=None, ip='10.0.0.3/24', reach='10.0.0.2', reach_tries='2')
        for _ in range(4):
            log = self.driver.console_log('lonely')
        self.assertEqual(2, log.count('VMCLOUD-REACH 10.0.0.2:80 no'))
        self.assertNotIn('VMCLOUD-NET', log)     # no NIC, no network

    def test_dhcp_from_the_fakes_leases(self):
        self.driver.leases['52:54:00:00:00:01'] = '10.0.0.7/24'
        self.spawn('a')
        self.spawn('b')
        self.assertIn('VMCLOUD-NET eth0 10.0.0.7/24\nVMCLOUD-PHASE boot-done',
                      self.driver.console_log('a'))
        self.assertIn('VMCLOUD-NET-FAILED', self.driver.console_log('b'))
        self.assertEqual('a 1', self.driver.reach('b', '10.0.0.7'))

    def test_an_unknown_bridge_is_refused_unless_simulated(self):
        spec = driver_base.InstanceSpec(
            name='a', disk=self.disk, nics=(driver_base.Nic('52:54:00:00:00:01', 'nobr'),))
        error = self.assertRaises(exception.InvalidSpec, self.driver.spawn, spec)
        self.assertIn('there is no bridge nobr on this host', str(error))
        simulated = sim.SimDriver(self.conf)
        simulated.spawn(spec)
        self.assertEqual(spec, simulated.instances['a'].spec)


class ThreadSafetyTest(base.TestCase):
    """Readers may run while other threads spawn and destroy (base.Driver's rules)."""

    def test_readers_during_spawns_and_destroys(self):
        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
        sys.setswitchinterval(1e-6)
        driver = sim.SimDriver(self.conf, host=mips.MipsHost('big', 64, 1e6, 10 ** 7))
        disk = os.path.join(self.tmp, 'disk.raw')
        open(disk, 'wb').close()
        stop = threading.Event()
        errors = []

        def churn(prefix):
            try:
                for i in range(300):
                    spec = driver_base.InstanceSpec(name=f'{prefix}{i}', disk=disk)
                    driver.spawn(spec)
                    if i % 2:
                        driver.destroy(spec.name)
            except Exception as exc:
                errors.append(exc)

        def read():
            try:
                while not stop.is_set():
                    driver.list_instances()
                    driver.host_capacity()
            except Exception as exc:
                errors.append(exc)

        readers = [threading.Thread(target=read) for _ in range(2)]
        writers = [threading.Thread(target=churn, args=(p,)) for p in 'abc']
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        self.assertEqual([], errors)
        self.assertEqual(450, len(driver.list_instances()))
