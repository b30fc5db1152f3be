"""First-touch order per boot phase: recorded on a first deployment, replayed as prefetch.

A profile names chunk indexes, not chunk ids, and is kept per image: the
versions of an image share a layout, so a snapshot boots with the profile its
parent recorded. It is kept in the warehouse, as the image's attachment
``boot-profile``, so a profile recorded on one node prefetches on every node
(the last node to record one wins).

A profile is a hint from the past, so it is checked before it is used: of
the expected shape, for the chunk size and chunk count of the version being
deployed, and recorded for a version of this image that still exists, the
very one (not a deleted one whose name was reused). A profile that fails any check, or that
cannot be read, is ignored with a warning naming the image; the next first
deployment records a new one.
"""
import json
import logging
import threading
from typing import Callable

from vmcloud import exception
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

BOOT = 'boot'
APPLICATION = 'application'
SHUTDOWN = 'shutdown'
PHASES = (BOOT, APPLICATION, SHUTDOWN)

# The guest's phase markers, as it prints them, and the recording phase each one
# starts. The mirror takes them as plain strings: it does not know the drivers.
BOOT_DONE = 'boot-done'
APP_RUNNING = 'app-running'
SHUTDOWN_STARTED = 'shutdown-started'
MARKERS = {BOOT_DONE: APPLICATION, APP_RUNNING: APPLICATION, SHUTDOWN_STARTED: SHUTDOWN}

Profile = dict[str, list[int]]

_FORMAT = 2


class Recorder:
    """The order in which chunks are first touched, split by the phase at the time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seen: set[int] = set()
        self._phase = BOOT
        self._order: Profile = {phase: [] for phase in PHASES}

    @property
    def phase(self) -> str:
        return self._phase

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f'unknown phase {phase!r}')
        self._phase = phase

    def advance(self, phase: str) -> None:
        """Move on to ``phase``, never back: a late marker must not reopen a phase."""
        with self._lock:
            if PHASES.index(phase) > PHASES.index(self._phase):
                self.set_phase(phase)

    def touch(self, first: int, last: int) -> None:
        if last - first == 0 and first in self._seen:
            return  # the common case, without the lock
        with self._lock:
            for index in range(first, last + 1):
                if index not in self._seen:
                    self._seen.add(index)
                    self._order[self._phase].append(index)

    def profile(self) -> Profile:
        with self._lock:
            return {phase: list(indexes) for phase, indexes in self._order.items()}


class _Ignored(Exception):
    """Why a profile is not used."""


class ProfileStore:
    """The boot profiles of a warehouse's images."""

    ATTACHMENT = 'boot-profile'

    def __init__(self, warehouse: warehouse_mod.Warehouse):
        self.warehouse = warehouse

    def load(self, manifest: manifest_mod.Manifest) -> Profile | None:
        """The profile of ``manifest``'s image if it fits ``manifest``, else None.

        Never raises: a profile is a hint. A missing one is None; one that cannot
        be read or does not fit is None and a warning naming the image.
        """
        image = manifest.image
        try:
            data = self.warehouse.read_attachment(image, self.ATTACHMENT)
            if data is None:
                return None
            return _check(json.loads(data), manifest, self.warehouse.lookup)
        except (exception.StorageError, OSError) as exc:
            LOG.warning('ignoring the boot profile of %s: cannot read it from the '
                        'warehouse: %s', image, exc)
        except ValueError as exc:  # not JSON, not UTF-8
            LOG.warning('ignoring the boot profile of %s: cannot read it: %s', image, exc)
        except _Ignored as exc:
            LOG.warning('ignoring the boot profile of %s: %s', image, exc)
        return None

    def save(self, manifest: manifest_mod.Manifest, profile: Profile) -> None:
        """Record ``profile`` as the image's, as seen on ``manifest``.

        :raises: StorageError (ImageNotFound if the image is gone meanwhile,
            AttachmentTooLarge).
        """
        document = {'format': _FORMAT, 'recorded_for': str(manifest.ref),
                    'identity': manifest.identity(), 'chunk_size': manifest.chunk_size,
                    'chunk_count': manifest.chunk_count,
                    'phases': {phase: list(profile.get(phase, [])) for phase in PHASES}}
        self.warehouse.write_attachment(manifest.image, self.ATTACHMENT,
                                        json.dumps(document, separators=(',', ':')).encode())


def _check(document, manifest: manifest_mod.Manifest,
           lookup: Callable[[str], manifest_mod.Manifest]) -> Profile:
    """The phases of a profile that fits ``manifest``. :raises: _Ignored saying why."""
    if not isinstance(document, dict) or document.get('format') != _FORMAT:
        raise _Ignored(f'not a format {_FORMAT} profile')
    fields = {'recorded_for': str, 'identity': str, 'chunk_size': int, 'chunk_count': int,
              'phases': dict}
    for field, kind in fields.items():
        value = document.get(field)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Ignored(f'{field!r} is missing or not of type {kind.__name__}')
    phases = document['phases']
    profile: Profile = {}
    for phase in PHASES:
        indexes = phases.get(phase, [])
        if not isinstance(indexes, list) or not all(
                type(i) is int for i in indexes):  # not isinstance: bool is an int too
            raise _Ignored(f'phase {phase!r} is not a list of chunk indexes')
        bad = next((i for i in indexes if not 0 <= i < manifest.chunk_count), None)
        if bad is not None:
            raise _Ignored(f'chunk {bad} is out of range for {manifest.ref}, which has '
                           f'{manifest.chunk_count} chunks')
        profile[phase] = indexes
    if (document['chunk_size'], document['chunk_count']) != (manifest.chunk_size,
                                                             manifest.chunk_count):
        raise _Ignored(f'it was recorded for {document["chunk_count"]} chunks of '
                       f'{document["chunk_size"]} bytes; {manifest.ref} has '
                       f'{manifest.chunk_count} of {manifest.chunk_size}')
    recorded_for = document['recorded_for']
    if recorded_for.partition(':')[0] != manifest.image:
        # A copy of another image's profile: its indexes name another layout.
        raise _Ignored(f'it was recorded for {recorded_for}, another image')
    if recorded_for == str(manifest.ref):
        recorded = manifest
    else:
        try:
            recorded = lookup(recorded_for)
        except exception.StorageError as exc:
            raise _Ignored(f'it was recorded for {recorded_for}, which is gone: {exc}') from exc
    if recorded.identity() != document['identity']:
        raise _Ignored(f'it was recorded for a deleted image that was also called '
                       f'{recorded_for}')
    return profile


class Prefetcher:
    """Fetches a profile's chunks in phase order on background threads.

    ``fetch(index)`` brings one chunk to the node; chunks already there cost nothing.
    """

    def __init__(self, profile: Profile, fetch: Callable[[int], None], threads: int):
        self._queue = [i for phase in PHASES for i in profile.get(phase, [])]
        self._fetch = fetch
        self._next = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True,
                                          name='vmcloud-prefetch') for _ in range(threads)]

    def start(self) -> 'Prefetcher':
        for thread in self._threads:
            thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                if self._next >= len(self._queue):
                    return
                index = self._queue[self._next]
                self._next += 1
            try:
                self._fetch(index)
            except (exception.VmcloudError, OSError) as exc:
                # Prefetch is a hint: the read that needs the chunk will retry and report.
                LOG.debug('prefetch of chunk %d failed: %s', index, exc)

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
