"""The dispatcher's state transitions, as functions of counts and states: no database.

Each function says what a deployment, a snapshot or an instance becomes after
something happened; the callers read the counts and write the result.
"""
import dataclasses
from collections.abc import Mapping

from vmcloud.dispatcher import states


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str
    reason: str = ''


def deployment(counts: Mapping[str, int], count: int, min_count: int) -> Outcome:
    """A deployment's state from its instances' states (``counts``: {state: how many}).

    Building while any instance builds; then active if at least ``min_count`` are
    active (naming how many failed or are unknown), unknown if that many could be
    active but some of them are on hosts that stopped reporting, else error.
    """
    if counts.get(states.BUILDING, 0):
        return Outcome(states.BUILDING)
    active, failed = counts.get(states.ACTIVE, 0), counts.get(states.ERROR, 0)
    unknown = counts.get(states.UNKNOWN, 0)
    missing = ', '.join(f'{n} instances {what}' for n, what in
                        ((failed, 'failed'), (unknown, 'unknown')) if n)
    if active >= min_count:
        return Outcome(states.ACTIVE, missing)
    if active + unknown >= min_count:
        return Outcome(states.UNKNOWN, f'{active} of {count} instances active, {min_count} '
                                       f'needed; {missing}')
    return Outcome(states.ERROR, f'only {active} of {count} instances became active, '
                                 f'{min_count} needed')


def snapshot(counts: Mapping[str, int]) -> Outcome:
    """A snapshot's state from its items' states.

    Uploading while any item freezes or uploads; then available if every item was
    stored, partial if some were, error if none.
    """
    if counts.get(states.FREEZING, 0) or counts.get(states.UPLOADING, 0):
        return Outcome(states.UPLOADING)
    failed, stored = counts.get(states.ERROR, 0), counts.get(states.AVAILABLE, 0)
    if not failed:
        return Outcome(states.AVAILABLE)
    return Outcome(states.PARTIAL if stored else states.ERROR,
                   f'{failed} instances could not be snapshotted')


def failed_hosts(recorded: str, host: str) -> list[str]:
    """The hosts an instance failed on (``recorded`` comma separated), with ``host``."""
    return [h for h in recorded.split(',') if h] + [host]


def out_of_attempts(attempts: int, max_attempts: int, host: str, reason: str) -> str | None:
    """Why a failed build is not retried because it used every attempt, or None."""
    if attempts >= max_attempts:
        return f'failed {attempts} times; last on {host}: {reason}'
    return None


def no_other_host(host: str, reason: str) -> str:
    """Why a failed build is not retried because no other host can take it."""
    return f'failed on {host}: {reason}; no other host can take it'


def on_silent_host(state: str, host: str) -> Outcome | None:
    """What an instance becomes when its host stopped sending heartbeats (None: as it is).

    A running guest may well run on (a network blip): nothing is known of it until its
    host reports again. A build is left to its report or its deadline.
    """
    if state == states.ACTIVE:
        return Outcome(states.UNKNOWN, f'compute host {host} stopped sending heartbeats')
    return None


def on_report(state: str, running: bool, settled: bool, host: str) -> Outcome | None:
    """What an instance on ``host`` becomes when the host reports which guests it runs
    (None: as it is).

    ``running``: the report lists its guest. ``settled``: its state is older than a
    heartbeat interval, so the report cannot predate it (a report sent before a build
    ended or a destroy began judges nothing). A build is left to its report or its
    deadline.
    """
    if state == states.UNKNOWN:
        if running:
            return Outcome(states.ACTIVE)
        return Outcome(states.ERROR, f'not running on {host} when it reported again')
    if running or not settled:
        return None
    if state == states.ACTIVE:
        return Outcome(states.ERROR, f'not running on {host}')
    if state == states.DELETING:
        return Outcome(states.DELETED)
    return None


def build_deadline_passed(build_timeout: int) -> str:
    """Why a build past its deadline is given up on that host."""
    return f'no build result within {build_timeout} s'
