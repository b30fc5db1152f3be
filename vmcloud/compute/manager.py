"""The compute manager: builds instances on mirrors, snapshots them, reports to the dispatcher."""
import collections.abc
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Optional

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.compute import artifacts as artifacts_mod
from vmcloud.compute import phases
from vmcloud.compute import rpcapi as compute_rpcapi
from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
from vmcloud.drivers import base as driver_base
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import manager as mirror_manager
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)


class _BarrierChanges(collections.abc.Mapping):
    """A barrier's chunks as the warehouse's snapshot_chunks wants them, read on demand."""

    def __init__(self, barrier: disk_mod.Barrier):
        self._barrier = barrier

    def __getitem__(self, index: int) -> bytes:
        if index not in self._barrier.indexes:
            raise KeyError(index)
        return self._barrier.read_chunk(index)

    def __iter__(self):
        return iter(sorted(self._barrier.indexes))

    def __len__(self) -> int:
        return len(self._barrier.indexes)


class ComputeManager:
    """One node. Several can live in one process (all-in-one), each with its own ``host``."""

    def __init__(self, conf: cfg.ConfigOpts, host: str | None = None,
                 driver: driver_base.Driver | None = None,
                 warehouse: warehouse_mod.Warehouse | None = None,
                 node_root: str | None = None):
        """``node_root``, if given, holds this node's mirrors, chunk cache and NBD socket
        instead of the ``[mirror]`` paths: the all-in-one mode runs several nodes in one
        process on one ``state_path``. A ``vmcloud compute`` service uses the ``[mirror]``
        paths, so a host's state is wherever its configuration puts it."""
        self.conf = conf
        self.host = host or conf.host
        self.warehouse = warehouse or warehouse_mod.Warehouse(conf)
        self.driver = driver or driver_base.load(conf)
        self.mirrors = mirror_manager.MirrorManager(conf, self.warehouse, root=node_root)
        # One copy per machine, even with several nodes in one process.
        self.artifacts = artifacts_mod.BootArtifacts(
            conf.compute.boot_artifacts_path, self.warehouse, conf.compute.boot_timeout)
        self.dispatcher = dispatcher_rpcapi.DispatcherAPI(conf, retry=-1)
        self._frozen: dict[str, float] = {}
        self._stopping = threading.Event()
        self._server = rpc.server(conf, compute_rpcapi.TOPIC, self.host, [self])
        self._heartbeat = threading.Thread(target=self._beat, daemon=True,
                                           name=f'heartbeat-{self.host}')

    def start(self) -> 'ComputeManager':
        self._server.start()
        self._heartbeat.start()
        return self

    def stop(self, destroy_instances: bool = False) -> None:
        """Stop serving. The mirrors stop with it, so guests left running lose their disks:
        the ``vmcloud compute`` service destroys them (a library user may hand them over)."""
        self._stopping.set()
        self._server.stop()
        self._server.wait()
        try:
            if destroy_instances:
                for name in self.mirrors.names():  # this node's, even if nodes share a driver
                    try:
                        self._destroy(name)
                    except exception.VmcloudError as exc:
                        LOG.error('cannot destroy %s while stopping: %s', name, exc)
                    except Exception:  # the other guests must still go
                        LOG.exception('cannot destroy %s while stopping', name)
        finally:
            # The cache, the NBD socket and the mirrors' locks are released, whatever happened.
            self.mirrors.close()

    # -- heartbeat ---------------------------------------------------------------

    def capacity(self) -> dict:
        capacity = self.driver.host_capacity()
        return {'vcpus': capacity.cpus, 'memory_mib': capacity.memory_mib,
                'disk_bytes_free': capacity.free_disk_bytes,
                'fetched_bytes': self.mirrors.cache.stats.fetched_bytes}

    def _beat(self) -> None:
        while not self._stopping.is_set():
            try:
                self.dispatcher.report_heartbeat(self.host, self.capacity())
            except (exception.VmcloudError, OSError) as exc:
                LOG.warning('heartbeat of %s not sent: %s', self.host, exc)
            except Exception:  # a dead thread would have this node marked down, guests and all
                LOG.exception('heartbeat of %s not sent', self.host)
            self._stopping.wait(self.conf.heartbeat_interval)

    # -- building ----------------------------------------------------------------

    @rpc.expose
    def build_instance(self, ctxt: dict, instance: dict) -> None:
        """Build on a mirror; report instance_built or build_failed, always one of them."""
        name = instance['name']
        started = time.monotonic()
        try:
            boot = instance.get('boot') or {}
            # Before the mirror: an artifact that cannot be had fails the build cheaply.
            files = {what: self.artifacts.path_of(boot[what])
                     for what in artifacts_mod.ARTIFACTS if boot.get(what)}
            mirror = self.mirrors.create(name, instance['image'])
            spec = driver_base.InstanceSpec(
                name=name, disk=mirror.uri, disk_format='raw',
                memory_mib=instance['memory_mib'], vcpus=instance['vcpus'],
                kernel=files.get('kernel'), initrd=files.get('initrd'),
                cmdline=boot.get('cmdline', '').replace('{name}', name))
            self.driver.boot(spec, self.conf.compute.boot_timeout)
            if self.driver.has(driver_base.Capability.PHASE_EVENTS):
                phases.follow(self.driver, self.mirrors, name)
            disk = mirror.disk
            needed = sum(disk.manifest.chunk_length(i) for i in disk.fetched_indexes())
        except Exception as exc:  # every failure goes back to the dispatcher, named
            LOG.warning('building %s on %s failed: %s', name, self.host, exc)
            reason = f'{type(exc).__name__}: {exc}'
            try:
                self._destroy(name)
            except Exception as cleanup:  # the dispatcher must hear of the failure anyway
                LOG.exception('cleaning up %s after its failed build', name)
                reason += f'; cleanup failed: {type(cleanup).__name__}: {cleanup}'
            self._report(self.dispatcher.build_failed, instance['id'], self.host, reason)
            return
        took = time.monotonic() - started
        LOG.info('%s built on %s in %.1f s', name, self.host, took)
        self._report(self.dispatcher.instance_built, instance['id'], self.host, took, needed)

    def _report(self, method, *args) -> None:
        try:
            method(*args)
        except exception.VmcloudError as exc:
            LOG.error('cannot report to the dispatcher: %s', exc)

    @rpc.expose
    def destroy_instance(self, ctxt: dict, name: str) -> None:
        self._destroy(name)

    def _destroy(self, name: str) -> None:
        if name in self.driver.list_instances():
            self.driver.destroy(name)
        try:
            self.mirrors.remove(name)
        except exception.MirrorNotFound:
            pass

    # -- snapshots ---------------------------------------------------------------

    @rpc.expose
    def freeze(self, ctxt: dict, names: list[str]) -> dict:
        """Pause the guests, all at once: each waits for the slowest, not for the sum."""
        if not self.driver.has(driver_base.Capability.SNAPSHOT_BARRIER):
            # Refused before any guest is touched: none of them waits for a thaw.
            refusal = f'the {self.conf.compute.driver} driver has no snapshot barrier'
            return {name: refusal for name in names}

        def freeze_one(name: str) -> str:
            # The guest's vCPUs stop when the freeze starts; draining its I/O comes after.
            started = time.monotonic()
            try:
                self.driver.freeze_io(name)
            except exception.VmcloudError as exc:
                return str(exc)
            self._frozen[name] = started
            LOG.info('%s frozen in %.1f ms', name, (time.monotonic() - started) * 1000)
            return ''
        return dict(zip(names, self._each(freeze_one, names)))

    @rpc.expose
    def barrier_and_thaw(self, ctxt: dict, snapshot_id: str, items: list[dict]) -> dict:
        taken = self._each(self._barrier_and_thaw, items)
        # Uploads start once every guest here runs again: they compete for the CPU.
        results, uploads = {}, []
        for item, (result, disk, barrier) in zip(items, taken):
            results[item['name']] = result
            if barrier is not None:
                uploads.append((item, disk, barrier))
        if uploads:
            # One upload for the whole barrier: one write session, so the chunks the
            # guests changed alike are sent once (Warehouse.snapshot_many).
            threading.Thread(target=rpc.with_current_request(self._upload),
                             args=(snapshot_id, uploads), daemon=True,
                             name=f'upload-{snapshot_id[:8]}').start()
        return results

    @staticmethod
    def _each(work, things: list) -> list:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(things))) as pool:
            return list(pool.map(rpc.with_current_request(work), things))

    def _barrier_and_thaw(self, item: dict) -> tuple[dict, Optional[disk_mod.MirrorDisk],
                                                     Optional[disk_mod.Barrier]]:
        name = item['name']
        disk = barrier = None
        try:
            disk = self.mirrors.get(name).disk
            barrier = disk.barrier()
        except (exception.VmcloudError, OSError) as exc:
            # Named for this guest alone: raised, it would leave the other guests'
            # barriers open, taken but never uploaded nor closed.
            error = str(exc)
        finally:
            try:
                self.driver.thaw_io(name)
            except exception.VmcloudError as exc:
                LOG.error('cannot resume %s after its snapshot barrier: %s', name, exc)
        frozen_at = self._frozen.pop(name, None)
        if barrier is None:
            return {'error': error}, None, None
        pause_ms = (time.monotonic() - frozen_at) * 1000 if frozen_at else 0.0
        return {'pause_ms': pause_ms, 'dirty_bytes': sum(
            disk.manifest.chunk_length(i) for i in barrier.indexes)}, disk, barrier

    def _upload(self, snapshot_id: str,
                uploads: list[tuple[dict, disk_mod.MirrorDisk, disk_mod.Barrier]]) -> None:
        """Store every item of one barrier with one snapshot_many, then report each."""
        try:
            # Every barrier is exited after the upload of all of them.
            with contextlib.ExitStack() as barriers:
                for _item, _disk, barrier in uploads:
                    barriers.enter_context(barrier)
                results = self.warehouse.snapshot_many(
                    [(disk.manifest.ref, _BarrierChanges(barrier))
                     for _item, disk, barrier in uploads])
        except Exception as exc:  # the session failed, so every item did: reported
            results = [exc] * len(uploads)
        for (item, _disk, _barrier), result in zip(uploads, results):
            if isinstance(result, warehouse_mod.WriteResult):
                version, uploaded, error = str(result.manifest.ref), result.new_bytes, ''
                LOG.info('snapshot of %s stored as %s: %d bytes new', item['name'], version,
                         uploaded)
            else:
                LOG.error('snapshot of %s failed: %s', item['name'], result)
                version, uploaded, error = '', 0, f'{type(result).__name__}: {result}'
            self._report(self.dispatcher.snapshot_item_done, snapshot_id, item['instance_id'],
                         version, uploaded, error)
