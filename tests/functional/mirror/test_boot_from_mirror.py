"""The test guest boots from a mirror under qemu and libvirt."""
import os
import re
import subprocess
import threading

from vmcloud.drivers import base as driver_base
from vmcloud.mirror import manager as manager_mod
from vmcloud.mirror import profile as profile_mod
from vmcloud.storage import warehouse
from tests import base
from tests import guest

BOOT_TIMEOUT = 60


class BootFromMirror:
    driver_name: str

    def setUp(self):
        super().setUp()
        self.warehouse = warehouse.Warehouse(self.conf)
        self.manifest = self.warehouse.import_image(guest.path('disk.img'), 'guest').manifest
        self.manager = manager_mod.MirrorManager(self.conf, self.warehouse)
        self.addCleanup(self.manager.close)
        self.driver = driver_base.load(self.conf, self.driver_name)

    def follow_phases(self, name: str) -> threading.Thread:
        """What the compute manager does: tell the mirror each marker the guest prints."""
        def follow() -> None:
            for marker in (driver_base.BOOT_DONE, driver_base.SHUTDOWN_STARTED):
                try:
                    self.driver.wait_for_event(name, marker, BOOT_TIMEOUT)
                except Exception:
                    return
                self.manager.set_phase(name, marker)

        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        return thread

    def debugfs(self, image: str, request: str) -> str:
        return subprocess.run(['/sbin/debugfs', '-R', request, image], capture_output=True,
                              text=True, check=True).stdout

    def test_boot_writes_into_the_dirty_set_and_fetches_only_what_it_touched(self):
        name = guest.unique_name(f'mirror-{self.driver_name}')
        mirror = self.manager.create(name, 'guest')
        spec = guest.spec(name, mirror.uri, disk_format='raw')
        self.addCleanup(lambda: name in self.driver.list_instances() and self.driver.destroy(name))
        self.driver.boot(spec, BOOT_TIMEOUT)
        self.follow_phases(name)
        self.driver.wait_for_event(name, driver_base.APP_RUNNING, BOOT_TIMEOUT)
        self.assertFalse(self.driver.stop(name, timeout=BOOT_TIMEOUT))
        self.driver.destroy(name)
        disk = mirror.disk

        # What the guest wrote is on the mirror, in chunks marked dirty.
        copy = os.path.join(self.tmp, 'after.raw')
        subprocess.run(['nbdcopy', mirror.uri, copy], check=True)
        self.assertEqual(name + '\n', self.debugfs(copy, 'cat /guest-wrote.txt'))
        block_size = int(re.search(r'Block size:\s+(\d+)',
                                   self.debugfs(copy, 'stats')).group(1))
        block = int(self.debugfs(copy, 'bmap /guest-wrote.txt 0').strip())
        self.assertIn(block * block_size // self.manifest.chunk_size, disk.dirty.indexes())

        # Bytes fetched from the warehouse are exactly the image chunks the guest needed.
        fetched = disk.fetched_indexes()
        touched = {i for phase in disk.recorder.profile().values() for i in phase}
        self.assertLessEqual(fetched, touched)
        ids = {self.manifest.chunks[i] for i in fetched} - {None}
        stored = {c: len(self.warehouse.read_chunk(c)) for c in ids}
        self.assertEqual(sum(stored.values()), self.manager.cache.stats.fetched_bytes)
        self.assertLess(self.manager.cache.stats.fetched_bytes, self.manifest.size)

        # Boot and application phases were told apart by the guest's markers.
        profile = disk.recorder.profile()
        self.assertTrue(profile[profile_mod.BOOT])
        self.assertTrue(profile[profile_mod.APPLICATION])
        self.manager.remove(name)
        self.assertEqual(profile, self.manager.profiles.load(self.manifest))


class QemuBootFromMirrorTest(BootFromMirror, base.TestCase):
    driver_name = 'qemu'


class LibvirtBootFromMirrorTest(BootFromMirror, base.TestCase):
    driver_name = 'libvirt'
