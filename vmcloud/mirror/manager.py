"""A compute node's mirrors: one chunk cache, one NBD server, one disk per instance."""
import dataclasses
import json
import logging
import os
import shutil
import threading
import urllib.parse

from oslo_config import cfg

from vmcloud import exception
from vmcloud.drivers import base as driver_base
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import profile as profile_mod
from vmcloud.nbd import server as nbd_server
from vmcloud.storage import durable
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class Mirror:
    name: str
    disk: disk_mod.MirrorDisk
    uri: str
    prefetcher: profile_mod.Prefetcher | None
    # Whether this deployment's first touches should become the image's profile.
    records_profile: bool


class MirrorManager:
    def __init__(self, conf: cfg.ConfigOpts, warehouse: warehouse_mod.Warehouse | None = None,
                 root: str | None = None):
        """``root``, if given, holds this node's mirrors, cache and socket instead of the
        configured paths: several nodes in one process (the all-in-one mode) each get one."""
        self.conf = conf
        self.warehouse = warehouse or warehouse_mod.Warehouse(conf)
        options = conf.mirror
        self.mirrors_path = options.mirrors_path if root is None else f'{root}/mirrors'
        self.cache = cache_mod.ChunkCache(
            options.cache_path if root is None else f'{root}/chunk-cache', options.cache_size,
            self.warehouse.read_chunk, options.fetch_attempts, options.fetch_retry_wait)
        self.profiles = profile_mod.ProfileStore(options.profiles_path)
        self.socket = options.nbd_socket if root is None else f'{root}/nbd.sock'
        self._lock = threading.Lock()
        self._mirrors: dict[str, Mirror] = {}
        os.makedirs(os.path.dirname(self.socket), exist_ok=True)
        self.server = nbd_server.NbdServer()
        self.server.listen_unix(self.socket)
        self.server.start()

    def _directory(self, name: str) -> str:
        manifest_mod.validate_image_name(name, 'mirror')
        return os.path.join(self.mirrors_path, name)

    def create(self, name: str, image: str) -> Mirror:
        """A new mirror of ``image`` (``NAME`` or ``NAME:VERSION``), served at once.

        :raises: MirrorExists, ImageNotFound.
        """
        directory = self._directory(name)
        manifest = self.warehouse.lookup(image)
        os.makedirs(self.mirrors_path, exist_ok=True)
        try:
            os.mkdir(directory)
        except FileExistsError:
            raise exception.MirrorExists(name) from None
        try:
            durable.replace(os.path.join(directory, 'meta.json'),
                            json.dumps({'image': str(manifest.ref)}).encode())
            return self._serve(name, directory, manifest)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def open(self, name: str) -> Mirror:
        """Serve a mirror again after a restart, with every write it had flushed.

        :raises: MirrorNotFound, CorruptMirrorState, ImageNotFound.
        """
        with self._lock:
            if name in self._mirrors:
                return self._mirrors[name]
        directory = self._directory(name)
        try:
            with open(os.path.join(directory, 'meta.json')) as f:
                ref = json.load(f)['image']
        except FileNotFoundError:
            raise exception.MirrorNotFound(name) from None
        except (ValueError, KeyError) as exc:
            raise exception.CorruptMirrorState(f'mirror {name}: bad meta.json: {exc}') from exc
        return self._serve(name, directory, self.warehouse.lookup(ref))

    def _serve(self, name: str, directory: str, manifest: manifest_mod.Manifest) -> Mirror:
        disk = disk_mod.MirrorDisk(directory, manifest, self.cache)
        profile = self.profiles.load(manifest.image)
        prefetcher = None
        if profile is not None and self.conf.mirror.prefetch_threads:
            prefetcher = profile_mod.Prefetcher(
                profile, disk.prefetch, self.conf.mirror.prefetch_threads).start()
        mirror = Mirror(name, disk, self.uri(name), prefetcher, records_profile=profile is None)
        with self._lock:
            self._mirrors[name] = mirror
        self.server.add_export(name, disk)
        return mirror

    def uri(self, name: str) -> str:
        return f'nbd+unix:///{name}?socket={urllib.parse.quote(self.socket)}'

    def names(self) -> list[str]:
        with self._lock:
            return list(self._mirrors)

    def get(self, name: str) -> Mirror:
        with self._lock:
            try:
                return self._mirrors[name]
            except KeyError:
                raise exception.MirrorNotFound(name) from None

    def follow_phases(self, driver: driver_base.Driver, name: str,
                      timeout: float = 24 * 3600) -> threading.Thread:
        """Switch the mirror's recording phase as the guest prints its markers."""
        disk = self.get(name).disk

        def follow() -> None:
            for marker, phase in ((driver_base.BOOT_DONE, profile_mod.APPLICATION),
                                  (driver_base.SHUTDOWN_STARTED, profile_mod.SHUTDOWN)):
                try:
                    driver.wait_for_event(name, marker, timeout)
                except exception.VmcloudError:
                    return  # the guest stopped or went away: the phase stays as it is
                disk.recorder.set_phase(phase)

        thread = threading.Thread(target=follow, daemon=True, name=f'phases-{name}')
        thread.start()
        return thread

    def _close(self, mirror: Mirror) -> None:
        self.server.remove_export(mirror.name)
        needed = mirror.disk.fetched_indexes()
        LOG.info('mirror %s: needed %d chunks of %s from the node cache; the node has fetched '
                 '%d bytes from the warehouse', mirror.name, len(needed),
                 mirror.disk.manifest.ref, self.cache.stats.fetched_bytes)
        if mirror.prefetcher is not None:
            mirror.prefetcher.stop()
        if mirror.records_profile and any(mirror.disk.recorder.profile().values()):
            self.profiles.save(mirror.disk.manifest.image, mirror.disk.recorder.profile())
        mirror.disk.close()

    def remove(self, name: str) -> None:
        """Stop serving a mirror and delete its local state. :raises: MirrorNotFound."""
        with self._lock:
            mirror = self._mirrors.pop(name, None)
        if mirror is None:
            raise exception.MirrorNotFound(name)
        self._close(mirror)
        shutil.rmtree(mirror.disk.directory)

    def close(self) -> None:
        """Stop serving; every mirror keeps its state for open() after a restart."""
        with self._lock:
            mirrors, self._mirrors = list(self._mirrors.values()), {}
        for mirror in mirrors:
            self._close(mirror)
        self.server.stop()
        self.cache.close()

    def __enter__(self) -> 'MirrorManager':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
