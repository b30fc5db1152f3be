"""Filters: each decides whether one host can take one more instance of a request.

A filter's verdict must depend only on the host and the request, never on the
other hosts: the scheduler filters every host once per request and afterwards
re-checks only the host it just placed an instance on. Placing an instance only
shrinks a host's free resources, so a host that failed stays failed.
"""
import abc

from oslo_config import cfg

from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest

NAMESPACE = 'vmcloud.scheduler.filters'


class BaseFilter(abc.ABC):
    """One predicate over (host, request). Plugins are built with the configuration.

    Filters read their options once, at construction: ``host_passes`` runs for
    every host of every request, and option look-ups are not free.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    @abc.abstractmethod
    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        """True if ``host`` can take one more instance of ``request``."""
