"""Following a guest through its phases, so that its mirror records first touches per phase.

The boot ends when the guest is ready: when its readiness check passed (see
``readiness``), whatever kind, so that the first touches of any image are split
into boot and application, not only of images that print vmcloud's markers. Its
shutdown starts when it prints the shutdown-started marker, if its image prints
one, else when the compute manager asks it to stop (``stopping``). The driver sees
markers, the mirror manager records phases; neither knows the other: the compute
manager joins them here.
"""
import logging
import threading
from typing import Protocol

from vmcloud import exception
from vmcloud.drivers import base as driver_base

LOG = logging.getLogger(__name__)


class PhaseRecorder(Protocol):
    def set_phase(self, name: str, phase: str) -> None:
        """Mirror ``name``'s guest reached marker ``phase``. :raises: MirrorNotFound."""


def follow(driver: driver_base.Driver, mirrors: PhaseRecorder, name: str,
           timeout: float = 24 * 3600) -> threading.Thread:
    """The guest ``name`` is ready (its check passed, or it was adopted running): tell
    ``mirrors`` its boot is over, now, then start a thread that tells them when it
    prints shutdown-started, if the driver sees markers (Capability.PHASE_EVENTS).

    The thread ends after that marker, or when the guest stops or goes away without it
    (``stopping`` is then the boundary), or when the mirror is gone.
    """
    # Before the build is reported: first touches from here on are the application's.
    followed = _tell(mirrors, name, driver_base.BOOT_DONE)

    def run() -> None:
        if not followed or not driver.has(driver_base.Capability.PHASE_EVENTS):
            return
        try:
            driver.wait_for_event(name, driver_base.SHUTDOWN_STARTED, timeout)
        except exception.VmcloudError:
            return
        _tell(mirrors, name, driver_base.SHUTDOWN_STARTED)

    thread = threading.Thread(target=run, daemon=True, name=f'phases-{name}')
    thread.start()
    return thread


def stopping(mirrors: PhaseRecorder, name: str) -> None:
    """The compute manager asks guest ``name`` to stop: its shutdown starts, for an image
    that prints no marker (phases only move forward: after the marker, nothing changes)."""
    _tell(mirrors, name, driver_base.SHUTDOWN_STARTED)


def _tell(mirrors: PhaseRecorder, name: str, marker: str) -> bool:
    """:returns: whether the mirror took it (False: it is gone, or failed, logged)."""
    try:
        mirrors.set_phase(name, marker)
        return True
    except exception.MirrorNotFound:
        return False
    except exception.VmcloudError as exc:
        # Only a recording: the guest runs on, its profile less precise.
        LOG.error('cannot record phase %s of %s: %s', marker, name, exc)
        return False
