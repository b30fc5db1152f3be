"""What the monitoring shows of the cloud from the dispatcher's side: counts of
deployments, instances, applications and hosts per cloud (each one GROUP BY, however
many deployments there are), and the events the dispatcher sent of late.

The connections are the gateway's to tell (vmcloud.dispatcher.clouds.gateway_stats).
"""
import collections
import datetime
import threading

from vmcloud.db import api as db_api
from vmcloud.dispatcher import states


def monitoring(session: db_api.Session) -> dict:
    """{'clouds': {name: {'connection_limit', 'hosts': [names] ([]: every host),
    'hosts_up', 'hosts_total', 'deployments': {state: n}, 'instances': {state: n},
    'applications_deployed': [names], 'applications_running': [names]}},
    'deployments': {state: n}, 'instances': {state: n},
    'hosts': {name: {'state', 'up', 'cpus', 'cpu_busy', 'cache_bytes', 'fetched_bytes',
                     'peer_bytes', 'instances'}}}.

    A cloud's counts leave out what is deleted (it is gone but for its row); the
    totals count every state. An application is deployed in a cloud while a deployment
    of it there is not deleted, running while one of those has an active instance.
    A host's 'instances' are those that may have a guest there (as the scheduler counts).
    """
    hosts = db_api.hosts(session)
    placed = db_api.instance_counts_by_host(session, states.HOLDING_STATES)
    up = {h.name for h in hosts if h.state == states.HOST_UP}
    listed = collections.defaultdict(list)
    for cloud, host in db_api.cloud_host_pairs(session):
        listed[cloud].append(host)
    deployments = _by_cloud(db_api.deployment_counts(session))
    instances = _by_cloud(db_api.instance_counts(session))
    deployed = _names_by_cloud(db_api.deployed_applications(session))
    running = _names_by_cloud(db_api.deployed_applications(session, states.ACTIVE))
    clouds = {}
    for cloud in db_api.clouds(session):
        members = listed[cloud.name] or [h.name for h in hosts]
        clouds[cloud.name] = {
            'connection_limit': cloud.connection_limit, 'hosts': listed[cloud.name],
            'hosts_up': sum(1 for h in members if h in up), 'hosts_total': len(members),
            'deployments': _live(deployments.get(cloud.name, {})),
            'instances': _live(instances.get(cloud.name, {})),
            'applications_deployed': deployed.get(cloud.name, []),
            'applications_running': running.get(cloud.name, [])}
    return {'clouds': clouds, 'deployments': _totals(deployments),
            'instances': _totals(instances),
            'hosts': {h.name: {'state': h.state, 'up': h.state == states.HOST_UP,
                               'cpus': h.cpus or h.vcpus, 'cpu_busy': h.cpu_busy,
                               'cache_bytes': h.cache_bytes, 'fetched_bytes': h.fetched_bytes,
                               'peer_bytes': h.peer_bytes, 'instances': placed.get(h.name, 0)}
                      for h in hosts}}


def _by_cloud(counts: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    result = collections.defaultdict(dict)
    for (cloud, state), count in counts.items():
        result[cloud][state] = count
    return result


def _live(counts: dict[str, int]) -> dict[str, int]:
    return {state: n for state, n in sorted(counts.items()) if state != states.DELETED}


def _totals(by_cloud: dict[str, dict[str, int]]) -> dict[str, int]:
    totals = collections.Counter()
    for counts in by_cloud.values():
        totals.update(counts)
    return dict(sorted(totals.items()))


def _names_by_cloud(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    result = collections.defaultdict(list)
    for cloud, name in pairs:
        result[cloud].append(name)
    return result


class EventHistory:
    """The last ``size`` events the dispatcher sent, in memory (a restart forgets them:
    the notifications on the bus are the record). Thread safe."""

    def __init__(self, size: int):
        self._events: collections.deque[dict] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def record(self, event: str, payload: dict) -> None:
        at = datetime.datetime.now(datetime.timezone.utc).isoformat()
        with self._lock:
            self._events.append({'at': at, 'event': event, 'payload': dict(payload)})

    def recent(self, limit: int = 50) -> list[dict]:
        """Up to ``limit`` of them, newest first."""
        with self._lock:
            newest = list(reversed(self._events))
        return newest[:max(limit, 0)]
