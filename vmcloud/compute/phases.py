"""Following a guest through its phases, so that its mirror records first touches per phase.

The guest prints a marker on its console as it finishes booting and as it starts
shutting down; the driver waits for markers, the mirror manager records phases.
Neither knows the other: the compute manager joins them here.
"""
import logging
import threading
from typing import Protocol

from vmcloud import exception
from vmcloud.drivers import base as driver_base

LOG = logging.getLogger(__name__)

# The markers that start a recording phase, in the order a guest prints them.
MARKERS = (driver_base.BOOT_DONE, driver_base.SHUTDOWN_STARTED)


class PhaseRecorder(Protocol):
    def set_phase(self, name: str, phase: str) -> None:
        """Mirror ``name``'s guest printed marker ``phase``. :raises: MirrorNotFound."""


def follow(driver: driver_base.Driver, mirrors: PhaseRecorder, name: str,
           timeout: float = 24 * 3600) -> threading.Thread:
    """Start a thread that tells ``mirrors`` each marker the guest ``name`` prints.

    It ends after the last marker, or when the guest stops or goes away (the phase
    then stays as it is), or when the mirror is gone.
    """
    def run() -> None:
        for marker in MARKERS:
            try:
                driver.wait_for_event(name, marker, timeout)
            except exception.VmcloudError:
                return
            try:
                mirrors.set_phase(name, marker)
            except exception.MirrorNotFound:
                return
            except exception.VmcloudError as exc:
                LOG.error('cannot record phase %s of %s: %s', marker, name, exc)
                return

    thread = threading.Thread(target=run, daemon=True, name=f'phases-{name}')
    thread.start()
    return thread
