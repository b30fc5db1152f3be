"""Waiting for something that another thread, process or host is doing."""
import time
from typing import Callable, TypeVar

from vmcloud import exception

T = TypeVar('T')


def wait(poll: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str,
         interval: float = 0.2,
         error: type[exception.VmcloudError] = exception.WaitTimedOut) -> T:
    """Call ``poll`` until ``done`` says yes to its result, and return that result.

    :raises: ``error`` (by default WaitTimedOut, which a caller can tell from the errors
        of ``poll``) naming ``what`` if it is not done within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = poll()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise error(f'{what} did not finish in {timeout:.0f} s')
        time.sleep(interval)
