"""A compute node's mirrors: one chunk cache, one NBD server, one disk per instance.

The node's state has one owner at a time: the chunk cache, the NBD socket and
each mirror directory are locked by the process that serves them (see
``vmcloud.nbd.statelock``), and a second process is refused with StateLocked
naming the first.

The mirrors do not watch the guests: whoever runs them (the compute manager)
follows the guest's phase markers and reports each one with ``set_phase``.

With ``[mirror] peer_address`` set the node also serves its cache to the other
compute nodes (``peer_http.PeerServer``) and its cache misses ask the chunk's owners
first (``peers.PeerExchange``); whoever runs the mirrors tells them the live node
set with ``set_peers``.
"""
import dataclasses
import json
import logging
import os
import shutil
import threading
import urllib.parse

from oslo_config import cfg

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import disk as disk_mod
from vmcloud.mirror import peer_http
from vmcloud.mirror import peers as peers_mod
from vmcloud.mirror import persist as persist_mod
from vmcloud.mirror import profile as profile_mod
from vmcloud.mirror import trace as trace_mod
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
    # What the NBD server serves in the disk's place with [mirror] trace_path set.
    trace: trace_mod.TracingDevice | None = None


class MirrorManager:
    def __init__(self, conf: cfg.ConfigOpts, warehouse: warehouse_mod.Warehouse | None = None,
                 root: str | None = None):
        """``root``, if given, holds this node's mirrors, cache and socket instead of the
        configured paths: several nodes in one process (the all-in-one mode) each get one.

        :raises: StateLocked naming the owner if another process (or manager)
            serves this node's chunk cache or NBD socket; NbdError; MirrorError if the
            peer server cannot listen on [mirror] peer_address and peer_port.
        """
        self.conf = conf
        self.warehouse = warehouse or warehouse_mod.Warehouse(conf)
        options = conf.mirror
        self.mirrors_path = options.mirrors_path if root is None else f'{root}/mirrors'
        # The peer exchange, None without [mirror] peer_address: the warehouse alone.
        self.peers: peers_mod.PeerExchange | None = None
        self.peer_server: peer_http.PeerServer | None = None
        self._peer_client: peer_http.PeerClient | None = None
        fetch, owned = self.warehouse.read_chunk, None
        if options.peer_address:
            self._peer_client = peer_http.PeerClient(options.peer_token, options.peer_timeout)
            self.peers = peers_mod.PeerExchange(
                self.warehouse.read_chunk, self._peer_client, options.peer_replicas,
                options.peer_skip_time)
            fetch, owned = self.peers.fetch, self.peers.owns
        self.cache = cache_mod.ChunkCache(
            options.cache_path if root is None else f'{root}/chunk-cache', options.cache_size,
            fetch, options.fetch_attempts, options.fetch_retry_wait,
            owned=owned, owned_share=options.owned_cache_share,
            replica_size=options.replica_size)
        # With peers: writes snapshots' replicated chunks to the warehouse, sweeps the
        # node's replicas (vmcloud.mirror.persist).
        self.persister: persist_mod.Persister | None = None
        self.profiles = profile_mod.ProfileStore(self.warehouse)
        self.socket = options.nbd_socket if root is None else f'{root}/nbd.sock'
        self._lock = threading.Lock()
        self._mirrors: dict[str, Mirror] = {}
        self.server = nbd_server.NbdServer(
            max_connection_bytes=options.nbd_connection_buffer,
            max_buffered_bytes=options.nbd_buffer)
        try:
            os.makedirs(os.path.dirname(self.socket), exist_ok=True)
            self.server.listen_unix(self.socket)
            self.server.start()
            if self.peers is not None:
                self.peer_server = peer_http.PeerServer(
                    self.cache, self.peers, options.peer_address, options.peer_port,
                    options.peer_token, options.peer_upload_rate, options.peer_threads,
                    connections_per_address=options.peer_connections_per_address)
                self.peer_server.start()
                self.persister = persist_mod.Persister(
                    self.warehouse, self.cache, self.peers, self._peer_client,
                    options.persist_check_interval).start()
        except BaseException:
            if self.persister is not None:
                self.persister.stop()
            if self.peer_server is not None:
                self.peer_server.stop()
            self.server.stop()
            self.cache.close()
            raise

    def _directory(self, name: str) -> str:
        manifest_mod.validate_image_name(name, 'mirror')
        return os.path.join(self.mirrors_path, name)

    def create(self, name: str, image: str) -> Mirror:
        """A new mirror of ``image`` (``NAME`` or ``NAME:VERSION``), served at once, its
        version held in the warehouse as ``holder(name)`` until remove().

        :raises: MirrorExists, ImageNotFound; StorageError if the hold cannot be taken
            (nothing is left behind then).
        """
        directory = self._directory(name)
        manifest = self.warehouse.lookup(image)
        os.makedirs(self.mirrors_path, exist_ok=True)
        try:
            os.mkdir(directory)
        except FileExistsError:
            raise exception.MirrorExists(name) from None
        holder, held = self.holder(name), False
        try:
            durable.replace(os.path.join(directory, 'meta.json'),
                            json.dumps({'image': str(manifest.ref)}).encode())
            # While the mirror exists its version must stay: `image rm` names the holder.
            self.warehouse.hold(str(manifest.ref), holder)
            held = True
            return self._serve(name, directory, manifest)
        except exception.StateLocked:
            raise  # another process got hold of it after our mkdir: it is theirs now
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            if held:
                self._release(str(manifest.ref), holder)
            raise

    def holder(self, name: str) -> str:
        """The warehouse holder name of mirror ``name`` on this node."""
        return f'mirror.{self.conf.host}.{name}'

    def _release(self, ref: str, holder: str) -> None:
        try:
            self.warehouse.release(ref, holder)
        except (exception.VmcloudError, OSError) as exc:
            # The mirror is gone already; a hold left behind only refuses `image rm`,
            # naming this holder, until the operator releases it or forces the removal.
            LOG.warning('cannot release the hold %s on %s: %s', holder, ref, exc)

    def open(self, name: str) -> Mirror:
        """Serve a mirror again after a restart, with every write it had flushed.

        :raises: MirrorNotFound, CorruptMirrorState, ImageNotFound; StateLocked
            naming the owner if another process serves the mirror.
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
        disk = disk_mod.MirrorDisk(directory, manifest, self.cache,
                                   self.conf.mirror.dirty_block_size)
        trace = None
        try:
            profile = self.profiles.load(manifest)
            if self.conf.mirror.trace_path:
                trace = trace_mod.TracingDevice(
                    disk, os.path.join(self.conf.mirror.trace_path, f'{name}.trace'),
                    manifest.chunk_size)
            self.server.add_export(name, disk if trace is None else trace)
        except BaseException:
            if trace is not None:
                trace.close()
            disk.close()
            raise
        prefetcher = None
        if profile is not None and self.conf.mirror.prefetch_threads:
            prefetcher = profile_mod.Prefetcher(
                profile, disk.prefetch, self.conf.mirror.prefetch_threads).start()
        mirror = Mirror(name, disk, self.uri(name), prefetcher, records_profile=profile is None,
                        trace=trace)
        with self._lock:
            self._mirrors[name] = mirror
        return mirror

    def uri(self, name: str) -> str:
        return f'nbd+unix:///{name}?socket={urllib.parse.quote(self.socket)}'

    # -- peers -------------------------------------------------------------------------

    def peer_url(self) -> str:
        """The URL the other nodes ask this node's chunks at; '' without peers."""
        return self.peer_server.url if self.peer_server is not None else ''

    def set_peers(self, me: str, peers: dict[str, str]) -> None:
        """The live node set: ``peers`` maps every node up (this one too) to its peer
        URL, ``me`` is this node's host name. Which chunks the node owns follows it.
        Without peers ([mirror] peer_address empty) nothing changes.

        :raises: MirrorError naming what is wrong with the arguments.
        """
        if self.peers is not None and self.peers.update(me, peers):
            self.cache.reclassify()

    def peer_stats(self) -> dict:
        """The peer server's /v1/stats document: the node set, what it served to peers,
        and what it fetched from the warehouse and had from peers; {} without peers."""
        return self.peer_server.document() if self.peer_server is not None else {}

    def warehouse_bytes(self) -> int:
        """Bytes of chunks the node has read from the warehouse since it started (for
        itself and, with peers, for the peers that asked it)."""
        if self.peers is None:
            return self.cache.stats.fetched_bytes
        return self.peers.stats()['repository_bytes']

    def names(self) -> list[str]:
        with self._lock:
            return list(self._mirrors)

    def get(self, name: str) -> Mirror:
        with self._lock:
            try:
                return self._mirrors[name]
            except KeyError:
                raise exception.MirrorNotFound(name) from None

    def set_phase(self, name: str, phase: str) -> None:
        """The guest of mirror ``name`` printed the phase marker ``phase``.

        ``phase`` is one of ``profile.MARKERS``: 'boot-done', 'app-running' or
        'shutdown-started'. First touches from now on are recorded in the
        phase the marker starts; phases only move forward, so a marker that
        comes late changes nothing.

        :raises: MirrorNotFound; MirrorError for an unknown marker.
        """
        try:
            recording = profile_mod.MARKERS[phase]
        except (KeyError, TypeError):
            raise exception.MirrorError(
                f'unknown guest phase {phase!r} for mirror {name}; expected one of '
                f'{", ".join(profile_mod.MARKERS)}') from None
        mirror = self.get(name)
        mirror.disk.recorder.advance(recording)
        if mirror.trace is not None:
            mirror.trace.mark(phase)

    def _close(self, mirror: Mirror, delete: bool = False) -> None:
        self.server.remove_export(mirror.name)
        if mirror.trace is not None:
            mirror.trace.close()  # the server no longer touches it: the trace is whole
        needed = mirror.disk.fetched_indexes()
        LOG.info('mirror %s: needed %d chunks of %s from the node cache; the node has fetched '
                 '%d bytes from the warehouse', mirror.name, len(needed),
                 mirror.disk.manifest.ref, self.warehouse_bytes())
        if mirror.prefetcher is not None:
            mirror.prefetcher.stop()
        if mirror.records_profile and any(mirror.disk.recorder.profile().values()):
            try:
                self.profiles.save(mirror.disk.manifest, mirror.disk.recorder.profile())
            except (exception.VmcloudError, OSError) as exc:
                # A hint lost; the mirror must still close and give up its lock.
                LOG.warning('cannot save the boot profile of %s in the warehouse: %s',
                            mirror.disk.manifest.image, exc)
        if delete:
            mirror.disk.remove()
        else:
            mirror.disk.close()

    def remove(self, name: str) -> None:
        """Stop serving a mirror, delete its local state, then release its hold on its
        version (a failed release is a warning: the mirror is gone).

        :raises: MirrorNotFound.
        """
        self._delete(self._take(name))

    def _take(self, name: str) -> Mirror:
        """Mirror ``name``, no longer listed (served until deleted). :raises: MirrorNotFound."""
        with self._lock:
            mirror = self._mirrors.pop(name, None)
        if mirror is None:
            raise exception.MirrorNotFound(name)
        return mirror

    def _delete(self, mirror: Mirror) -> None:
        self._close(mirror, delete=True)
        self._release(str(mirror.disk.manifest.ref), self.holder(mirror.name))

    def close(self) -> None:
        """Stop serving; every mirror keeps its state for open() after a restart.

        One mirror that fails to close (its last flush fails) does not keep the
        others, the socket or the cache from being given up; the first error is
        raised once all of them are.
        """
        with self._lock:
            mirrors, self._mirrors = list(self._mirrors.values()), {}
        failure = None
        for mirror in mirrors:
            try:
                self._close(mirror)
            except Exception as exc:
                LOG.error('mirror %s did not close cleanly: %s', mirror.name, exc)
                failure = failure or exc
        try:
            if self.persister is not None:
                # Before the cache closes: a write cut short is the sweeps' to finish.
                self.persister.stop()
            if self.peer_server is not None:
                self.peer_server.stop()  # first: no peer reads the cache once it is closed
                self._peer_client.close()
        finally:
            try:
                self.server.stop()
            finally:
                self.cache.close()
        if failure is not None:
            raise failure

    def __enter__(self) -> 'MirrorManager':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
