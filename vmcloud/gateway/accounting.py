"""Who is connected, and each cloud's counts: from what HAProxy tells (pure functions),
plus the totals of HAProxy's past runs (Counters, a JSON file).

Sources, all read from the admin socket (vmcloud.gateway.haproxy):

- ``show table st_conns data.conn_cur gt 0``: one entry per open client connection,
  key ``client:port>listener_port``, gpt0 = when it was accepted, gpt1 = 1 + the id of
  the server that answered its last HTTP request (0: none yet);
- ``show sess``: the streams; a TCP connection's names its server (an idle HTTP
  keep-alive connection has no stream, hence gpt1);
- ``show servers state``: a server's id -> its name, the instance id;
- ``st_clouds`` / ``st_rejects``: per cloud the open connections, the cumulative
  admitted and refused ones and the bytes, since this HAProxy started.
"""
import collections
import json
import os
import threading
from collections.abc import Iterable, Mapping

from vmcloud import exception
from vmcloud.gateway import config
from vmcloud.storage import durable

# The cumulative counters of one cloud, as stats() names them.
CUMULATIVE = ('total_connections', 'rejected_connections', 'bytes_in', 'bytes_out')
_NO_SERVER = '<none>'


def split_connection_key(key: str) -> tuple[str, int, int]:
    """``'1.2.3.4:5000>21000'`` (an st_conns key) -> ('1.2.3.4', 5000, 21000); IPv6
    addresses keep their colons.

    :raises: ValueError if ``key`` is not one.
    """
    source, _, listener_port = key.rpartition('>')
    client, _, client_port = source.rpartition(':')
    if not client:
        raise ValueError(f'not a connection key: {key!r}')
    return client, int(client_port), int(listener_port)


def _session_servers(sessions: Iterable[dict]) -> dict[tuple[str, int], str]:
    """(client address, client port) -> the server of its stream, for the listeners'
    streams that have one."""
    found = {}
    for session in sessions:
        if session.get('fe') not in config.FRONTENDS.values():
            continue
        server = session.get('srv', _NO_SERVER)
        client, _, port = session.get('src', '').rpartition(':')
        if server != _NO_SERVER and client and port.isdigit():
            found[(client, int(port))] = server
    return found


def _server_names(servers: Mapping) -> dict[int, str]:
    return {server.id: server.name for server in servers.values()}


def connections(table_rows: Iterable[dict], sessions: Iterable[dict],
                servers_by_backend: Mapping[str, Mapping], listeners: Iterable[dict],
                slots: Mapping[int | str, str], cloud: str | None = None) -> list[dict]:
    """The open client connections, each ``{'client', 'client_port', 'cloud',
    'application', 'deployment', 'instance' (id, or None before an HTTP connection's
    first answer), 'instance_name' (its name, as the listener's instances say it; None
    when unknown: no instance yet, or one that left the listener and still holds the
    connection), 'listener_port', 'started_at' (epoch s)}``, sorted.

    ``table_rows``: st_conns entries (HAProxy.show_table); ``sessions``:
    HAProxy.sessions(); ``servers_by_backend``: backend -> HAProxy.servers(backend);
    ``listeners``: the gateway state's; ``slots``: listener port -> its backend (the
    port-slot map). A connection to a port no listener holds any more (a deployment
    being deleted) is left out; so are other clouds' if ``cloud`` is given.
    """
    by_port = {int(listener['listener_port']): listener for listener in listeners}
    # The servers are named by instance id; the state knows each one's name.
    instance_names = {instance['id']: instance.get('name')
                      for listener in by_port.values()
                      for instance in listener.get('instances', ())}
    slots = {int(port): backend for port, backend in slots.items()}
    stream_servers = _session_servers(sessions)
    names = {backend: _server_names(servers)
             for backend, servers in servers_by_backend.items()}
    records = []
    for row in table_rows:
        if row.get('conn_cur', 0) <= 0:
            continue
        client, client_port, listener_port = split_connection_key(row['key'])
        listener = by_port.get(listener_port)
        if listener is None or (cloud is not None and listener['cloud'] != cloud):
            continue
        instance = stream_servers.get((client, client_port))
        if instance is None and row.get('gpt1', 0) > 0:
            backend_names = names.get(slots.get(listener_port), {})
            instance = backend_names.get(row['gpt1'] - 1)
        records.append({
            'client': client, 'client_port': client_port,
            'cloud': listener['cloud'], 'application': listener.get('application'),
            'deployment': listener['deployment'], 'instance': instance,
            'instance_name': instance_names.get(instance),
            'listener_port': listener_port, 'started_at': row.get('gpt0', 0)})
    records.sort(key=lambda r: (r['listener_port'], r['client'], r['client_port']))
    return records


def run_counters(cloud_rows: Iterable[dict], reject_rows: Iterable[dict]
                 ) -> dict[str, dict[str, int]]:
    """Cloud -> its CUMULATIVE counters in this HAProxy run, from the st_clouds and
    st_rejects entries."""
    counters: dict[str, dict[str, int]] = collections.defaultdict(
        lambda: dict.fromkeys(CUMULATIVE, 0))
    for row in cloud_rows:
        counters[row['key']].update(total_connections=row.get('conn_cnt', 0),
                                    bytes_in=row.get('bytes_in_cnt', 0),
                                    bytes_out=row.get('bytes_out_cnt', 0))
    for row in reject_rows:
        counters[row['key']]['rejected_connections'] = row.get('conn_cnt', 0)
    return dict(counters)


def cloud_stats(state: dict, records: Iterable[dict], cloud_rows: Iterable[dict],
                totals: Mapping[str, Mapping[str, int]], cloud: str | None = None
                ) -> dict[str, dict]:
    """Cloud name -> ``{'cloud', 'connection_limit', 'applications_deployed' (its
    listeners), 'applications_running' (those with an active instance),
    'users_connected' (distinct client addresses), 'active_connections',
    'available_connections', 'total_connections', 'rejected_connections', 'bytes_in',
    'bytes_out', 'per_instance': {instance id: open connections}}``, for every cloud of
    ``state`` (the gateway state), or only ``cloud``.

    ``records``: connections(); ``cloud_rows``: the st_clouds entries (their conn_cur is
    what the limit is checked against); ``totals``: cloud -> CUMULATIVE counters of
    every HAProxy run (Counters.update).

    :raises: CloudNotFound if ``cloud`` is given and not in ``state``.
    """
    if cloud is not None and cloud not in state['clouds']:
        raise exception.CloudNotFound(cloud)
    names = [cloud] if cloud is not None else sorted(state['clouds'])
    active = {row['key']: row.get('conn_cur', 0) for row in cloud_rows}
    records = list(records)
    stats = {}
    for name in names:
        listeners = [lst for lst in state['listeners'] if lst['cloud'] == name]
        mine = [record for record in records if record['cloud'] == name]
        per_instance = {instance['id']: 0 for lst in listeners
                        for instance in lst['instances']}
        for record in mine:
            if record['instance'] is not None:
                per_instance[record['instance']] = per_instance.get(record['instance'], 0) + 1
        limit = state['clouds'][name]['connection_limit']
        stats[name] = {
            'cloud': name,
            'connection_limit': limit,
            'applications_deployed': len(listeners),
            'applications_running': sum(1 for lst in listeners if lst['instances']),
            'users_connected': len({record['client'] for record in mine}),
            'active_connections': active.get(name, 0),
            'available_connections': max(0, limit - active.get(name, 0)),
            **{key: totals.get(name, {}).get(key, 0) for key in CUMULATIVE},
            'per_instance': per_instance,
        }
    return stats


class Counters:
    """The CUMULATIVE counters of HAProxy's runs, kept in a JSON file so that they
    survive an HAProxy restart (a new HAProxy counts from zero).

    The file holds the sum of the finished runs (``past``) and the last reading of the
    current one (``run``, ``current``): when update() sees another run, the last
    reading of the previous one joins ``past``. What a run counted after its last
    reading is lost with it: read at every poll.
    """

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {'past': {}, 'run': None, 'current': {}}
        except (OSError, ValueError) as exc:
            raise exception.GatewayError(
                f'cannot read the gateway\'s counters {self.path}: {exc}') from exc
        return data

    def _save(self, data: dict) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            durable.replace(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as exc:
            raise exception.GatewayError(
                f'cannot write the gateway\'s counters {self.path}: {exc}') from exc

    def update(self, run: str, current: Mapping[str, Mapping[str, int]]
               ) -> dict[str, dict[str, int]]:
        """Record ``current`` (cloud -> CUMULATIVE counters, run_counters()) as the
        reading of HAProxy run ``run`` (HAProxy.run_id()); the totals of all runs.

        :raises: GatewayError if the file cannot be read or written.
        """
        with self._lock:
            data = self._load()
            if data['run'] is not None and data['run'] != run:
                data['past'] = _added(data['past'], data['current'])
                data['current'] = {}
            reading = {name: {key: int(values.get(key, 0)) for key in CUMULATIVE}
                       for name, values in current.items()}
            if data['run'] != run or data['current'] != reading:
                data['run'], data['current'] = run, reading
                self._save(data)
            return _added(data['past'], data['current'])


def _added(a: Mapping[str, Mapping[str, int]], b: Mapping[str, Mapping[str, int]]
           ) -> dict[str, dict[str, int]]:
    return {name: {key: a.get(name, {}).get(key, 0) + b.get(name, {}).get(key, 0)
                   for key in CUMULATIVE}
            for name in sorted(set(a) | set(b))}
