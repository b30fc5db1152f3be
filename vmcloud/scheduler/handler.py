"""The filter scheduler: places the instances of one request on hosts, one at a time.

Each instance goes through the same steps: drop the hosts a configured filter
rejects, weigh the rest with the configured weighers, rescale each weigher to
0..1 and multiply it by its multiplier, take the host with the highest total
(ties go to the host whose name sorts first), and account for the instance on
a private copy of that host so that the next instance sees it.

Doing those steps from scratch for every instance costs hosts x instances
filter calls. Filters and weighers look at one host at a time, and placing an
instance changes only the chosen host, so the full filter and weigh pass runs
once per request and each placement re-checks and re-weighs only that host.
"""
import collections
import copy
import logging
from collections.abc import Sequence

from oslo_config import cfg

from vmcloud import exception
from vmcloud import plugins
from vmcloud.scheduler import filters
from vmcloud.scheduler import weights
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest

LOG = logging.getLogger(__name__)


class FilterScheduler:
    """Filters and weighers loaded from ``[scheduler]``, in their configured order.

    :raises: PluginNotFound at construction if a configured filter or weigher
        is not installed.
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf
        options = conf.scheduler
        self.filters: list[tuple[str, filters.BaseFilter]] = [
            (name, plugins.load(filters.NAMESPACE, name, conf))
            for name in options.enabled_filters]
        self.weighers: list[tuple[str, weights.BaseWeigher, float]] = []
        for name in options.weighers:
            weigher = plugins.load(weights.NAMESPACE, name, conf)
            self.weighers.append((name, weigher, weigher.multiplier(conf)))
        # A weigher multiplied by 0 cannot change the outcome; skip its work.
        self._active = [(w, m) for _, w, m in self.weighers if m != 0]

    def filter_hosts(self, hosts: Sequence[HostState],
                     request: InstanceRequest) -> list[HostState]:
        """The hosts that pass every filter, in their given order."""
        return self._filter(hosts, request, collections.Counter())

    def weigh_hosts(self, hosts: Sequence[HostState],
                    request: InstanceRequest) -> list[tuple[HostState, float]]:
        """``hosts`` with their total weights, best first, equal weights by host name."""
        raw = [[w.weigh(h, request) for h in hosts] for w, _ in self._active]
        totals = self._totals(raw, len(hosts))
        order = sorted(range(len(hosts)), key=lambda i: (-totals[i], hosts[i].name))
        return [(hosts[i], totals[i]) for i in order]

    def select_hosts(self, hosts: Sequence[HostState], request: InstanceRequest,
                     count: int, min_count: int | None = None) -> list[str]:
        """Place ``count`` instances of ``request`` and return their host names in order.

        A host may appear several times. The caller's HostStates are left
        untouched. If at least ``min_count`` (default: all ``count``) but not
        all instances fit, as many as fit are placed.

        :raises: NoValidHost if fewer than ``min_count`` instances fit.
        :raises: ValueError unless 0 <= min_count <= count.
        """
        if min_count is None:
            min_count = count
        if not 0 <= min_count <= count:
            raise ValueError(f'need 0 <= min_count <= count, got {min_count} and {count}')
        eliminated: collections.Counter[str] = collections.Counter()
        # Sorted by name so that the first of several equal totals is the tie winner.
        candidates = self._filter(sorted(hosts, key=lambda h: h.name), request, eliminated)
        # Candidates start as the caller's objects and are copied on first placement.
        owned = [False] * len(candidates)
        raw = [[w.weigh(h, request) for h in candidates] for w, _ in self._active]
        chosen: list[str] = []
        while len(chosen) < count and candidates:
            totals = self._totals(raw, len(candidates))
            best = totals.index(max(totals))
            host = candidates[best]
            if not owned[best]:
                host = candidates[best] = copy.copy(host)
                owned[best] = True
            host.consume(request)
            chosen.append(host.name)
            LOG.debug('instance %d of %d: host %s, weight %.3f',
                      len(chosen), count, host.name, totals[best])
            rejected_by = self._first_rejecting(host, request)
            if rejected_by is None:
                for values, (weigher, _) in zip(raw, self._active):
                    values[best] = weigher.weigh(host, request)
                continue
            eliminated[rejected_by] += 1
            del candidates[best], owned[best]
            for values in raw:
                del values[best]
            LOG.debug('filter %s: host %s is full after instance %d; %d hosts left',
                      rejected_by, host.name, len(chosen), len(candidates))
            if not candidates:
                LOG.info('filter %s eliminated the last host after %d of %d instances',
                         rejected_by, len(chosen), count)
        if len(chosen) < min_count:
            filter_name, most = None, 0
            if eliminated:
                # most_common keeps insertion order on ties: the earliest filter wins.
                filter_name, most = eliminated.most_common(1)[0]
            raise exception.NoValidHost(count, min_count, len(chosen), len(hosts),
                                        filter_name if most else None, most)
        if len(chosen) < count:
            LOG.info('placed %d of %d instances (at least %d were required)',
                     len(chosen), count, min_count)
        return chosen

    def _filter(self, hosts: Sequence[HostState], request: InstanceRequest,
                eliminated: collections.Counter) -> list[HostState]:
        passed = list(hosts)
        for name, host_filter in self.filters:
            before = len(passed)
            passed = [h for h in passed if host_filter.host_passes(h, request)]
            eliminated[name] += before - len(passed)
            LOG.debug('filter %s: %d hosts before, %d after', name, before, len(passed))
            if before and not passed:
                LOG.info('filter %s eliminated all %d remaining hosts', name, before)
                break
        return passed

    def _first_rejecting(self, host: HostState, request: InstanceRequest) -> str | None:
        for name, host_filter in self.filters:
            if not host_filter.host_passes(host, request):
                return name
        return None

    def _totals(self, raw: list[list[float]], count: int) -> list[float]:
        totals = [0.0] * count
        for values, (_, multiplier) in zip(raw, self._active):
            totals = [t + multiplier * v
                      for t, v in zip(totals, weights.normalize(values))]
        return totals
