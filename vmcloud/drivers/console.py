"""Reading guests' serial consoles: phase markers and the log."""
import re
import time
from typing import Callable

from vmcloud import exception

MARKER = 'VMCLOUD-PHASE'
_POLL_SECONDS = 0.05


def read(path: str) -> str:
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
    except FileNotFoundError:
        return ''


def has_marker(text: str, event: str) -> bool:
    return re.search(rf'^{MARKER} {re.escape(event)}\r?$', text, re.MULTILINE) is not None


def wait_for_line(path: str, pattern: str, timeout: float, alive: Callable[[], bool],
                  what: str) -> None:
    """Wait until a line of the file at ``path`` matches ``pattern``.

    :raises: GuestTimeout naming ``what`` and showing the console's last lines,
        after ``timeout`` seconds or as soon as ``alive()`` turns false.
    """
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    position = 0
    seen = ''
    while True:
        try:
            with open(path, 'rb') as f:
                f.seek(position)
                chunk = f.read()
                position = f.tell()
        except FileNotFoundError:
            pass    # not written yet, or removed with its instance: alive() says which
        else:
            # Keep a tail so a marker split across two reads is still found.
            seen = (seen + chunk.decode('utf-8', 'replace'))[-65536:]
            if regex.search(seen):
                return
        if not alive():
            reason = 'the guest stopped first'
        elif time.monotonic() >= deadline:
            reason = f'not within {timeout:g} s'
        else:
            time.sleep(_POLL_SECONDS)
            continue
        tail = ' | '.join(line for line in seen.splitlines()[-5:] if line.strip())
        raise exception.GuestTimeout(
            f'{what}: {reason}; console ends with: {tail or "(nothing)"}')


def wait_for_marker(path: str, name: str, event: str, timeout: float,
                    alive: Callable[[], bool]) -> None:
    wait_for_line(path, rf'^{MARKER} {re.escape(event)}\r?$', timeout, alive,
                  f'instance {name} did not reach {event}')
