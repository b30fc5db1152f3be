"""First-touch order per boot phase: recorded on a first deployment, replayed as prefetch.

A profile names chunk indexes, not chunk ids, and is kept per image: the
versions of an image share a layout, so a snapshot boots with the profile its
parent recorded.
"""
import json
import logging
import os
import threading
from typing import Callable

from vmcloud import exception
from vmcloud.storage import durable

LOG = logging.getLogger(__name__)

BOOT = 'boot'
APPLICATION = 'application'
SHUTDOWN = 'shutdown'
PHASES = (BOOT, APPLICATION, SHUTDOWN)

Profile = dict[str, list[int]]


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


class ProfileStore:
    def __init__(self, path: str):
        self.path = path

    def _file(self, image: str) -> str:
        return os.path.join(self.path, f'{image}.json')

    def load(self, image: str) -> Profile | None:
        try:
            with open(self._file(image)) as f:
                profile = json.load(f)
        except FileNotFoundError:
            return None
        except ValueError as exc:
            LOG.warning('ignoring the unreadable boot profile of %s: %s', image, exc)
            return None
        return {phase: [int(i) for i in profile.get(phase, [])] for phase in PHASES}

    def save(self, image: str, profile: Profile) -> None:
        os.makedirs(self.path, exist_ok=True)
        durable.replace(self._file(image), json.dumps(profile).encode())


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
            except exception.VmcloudError as exc:
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
