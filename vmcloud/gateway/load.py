"""How the gateway shares a listener's new connections among its instances: HAProxy
weights from the hosts' free CPU capacity and the instances' live connections.

Pure: no I/O, no clock. For host h of the listener's instances::

    headroom_h  = max(MIN_HEADROOM, 1 - cpu_busy_h)      (MIN_HEADROOM if h is not up)
    free_cpus_h = cpus_h * headroom_h
    raw_i       = free_cpus_h / n_h / (1 + a_i / CONNECTION_SCALE)
    weight_i    = max(1, round(MAX_WEIGHT * raw_i / max_j raw_j))

with ``n_h`` the listener's instances on h and ``a_i`` the connections instance i holds
now. HAProxy's weighted round-robin then gives instance i the share
``weight_i / sum(weights)`` of the new connections (``expected_shares``). doc/gateway.md
works an example through.
"""
from typing import Mapping, Sequence

# A busy host still gets some connections: its instances may be the only ones, and a
# host reported 100 % busy by one heartbeat is often less by the next.
MIN_HEADROOM = 0.05
# Connections that halve an instance's share: the CPU figures lag a heartbeat behind,
# the connection counts do not, so they correct a burst the CPU has not shown yet.
CONNECTION_SCALE = 100
# HAProxy's largest server weight (weights are 0..256; 0 would take the server out).
MAX_WEIGHT = 256


def headroom(host: Mapping | None) -> float:
    """The fraction of ``host``'s CPUs free for more work, at least MIN_HEADROOM; a host
    that is not up (or unknown) counts MIN_HEADROOM."""
    if not host or not host.get('up', False):
        return MIN_HEADROOM
    busy = float(host.get('cpu_busy') or 0.0)
    return max(MIN_HEADROOM, 1.0 - min(max(busy, 0.0), 1.0))


def free_cpus(host: Mapping | None) -> float:
    """CPUs of ``host`` free for more work (its ``cpus`` x its headroom); an unknown host
    counts as one CPU at MIN_HEADROOM."""
    cpus = int((host or {}).get('cpus') or 1)
    return max(cpus, 1) * headroom(host)


def raw_shares(hosts: Mapping[str, Mapping], instances: Sequence[Mapping],
               connections: Mapping[str, int]) -> dict[str, float]:
    """Each instance's unnormalised share: its host's free CPUs split among the
    listener's instances there, damped by the connections it holds."""
    per_host: dict[str, int] = {}
    for instance in instances:
        per_host[instance['host']] = per_host.get(instance['host'], 0) + 1
    raw = {}
    for instance in instances:
        host = instance['host']
        active = max(int(connections.get(instance['id'], 0)), 0)
        raw[instance['id']] = (free_cpus(hosts.get(host)) / per_host[host]
                               / (1.0 + active / CONNECTION_SCALE))
    return raw


def weights(hosts: Mapping[str, Mapping], instances: Sequence[Mapping],
            connections: Mapping[str, int]) -> dict[str, int]:
    """HAProxy weights (1..MAX_WEIGHT) of one listener's ``instances``.

    :param hosts: host name -> {'cpus', 'cpu_busy', 'up', ...} (the gateway state's
        'hosts'); a host missing from it counts as not up.
    :param instances: [{'id', 'host', ...}] of the listener.
    :param connections: instance id -> connections it holds now (missing: 0).
    :returns: instance id -> weight; the instance of most free capacity gets MAX_WEIGHT.
    """
    raw = raw_shares(hosts, instances, connections)
    if not raw:
        return {}
    top = max(raw.values())
    return {ident: max(1, round(MAX_WEIGHT * value / top)) for ident, value in raw.items()}


def expected_shares(weights_by_instance: Mapping[str, int]) -> dict[str, float]:
    """The fraction of new connections each instance gets under HAProxy's weighted
    round-robin with these weights (they sum to 1; empty for no instance)."""
    total = sum(weights_by_instance.values())
    if total <= 0:
        return {ident: 0.0 for ident in weights_by_instance}
    return {ident: weight / total for ident, weight in weights_by_instance.items()}
