"""Weighers: each ranks the hosts that passed the filters by one raw quantity.

A weigher returns a raw number (MiB, vCPUs, ...). The scheduler rescales each
weigher's numbers over the candidate hosts to 0..1 (``normalize``), so that
weighers of different units can be added, then multiplies them by the weigher's
configured multiplier. The highest total wins. Like a filter's verdict, a raw
weight must depend only on the host and the request.
"""
import abc
from collections.abc import Sequence

from oslo_config import cfg

from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest

NAMESPACE = 'vmcloud.scheduler.weights'


class BaseWeigher(abc.ABC):
    """One raw ranking quantity. Plugins are built with the configuration."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    def multiplier(self, conf: cfg.ConfigOpts) -> float:
        """Factor applied to the normalised weight: >0 favours high raw weights,
        <0 favours low ones, 0 turns the weigher off."""
        return 1.0

    @abc.abstractmethod
    def weigh(self, host: HostState, request: InstanceRequest) -> float:
        """The raw, unnormalised weight of ``host`` for ``request``."""


def normalize(values: Sequence[float]) -> list[float]:
    """Min-max rescale ``values`` to 0..1.

    When all values are equal the weigher cannot tell the hosts apart, so every
    value becomes 0 rather than an arbitrary constant that would skew the sum.
    """
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [0.0] * len(values)
    span = high - low
    return [(v - low) / span for v in values]
