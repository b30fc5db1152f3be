"""HAProxy's one static configuration, written once at start and never changed.

HAProxy 2.6 cannot add a frontend or a backend at runtime, and a reload would reset
the stick tables' counters and split the connection counting of one cloud between the
old and the new worker. So everything that changes is programmed through the runtime
API (see vmcloud.gateway.haproxy):

- two frontends bind whole port ranges, ``fe_http`` (``[gateway] listener_ports``) and
  ``fe_tcp`` (``tcp_listener_ports``); a listener is one port of a range;
- the maps (files under ``maps/``, empty at first) say, per listener port, its backend
  slot, cloud, cloud's limit, application and application's limit; a port in no map is
  refused;
- ``[gateway] backend_slots`` empty backends per protocol (``http_slotN``,
  ``tcp_slotN``), one per exposed deployment, take the instances as dynamic servers;
- stick tables count: ``st_clouds`` and ``st_apps`` the admitted connections (current,
  cumulative, bytes), ``st_rejects`` the refused ones per cloud, ``st_conns`` one entry
  per open client connection (key ``src:sport>dport``; gpt0 = accept time, epoch
  seconds; gpt1 = 1 + id of the server that answered its last HTTP request).

The limit check compares a cloud's (and an application's) ``conn_cur`` with its limit
before the connection is tracked, so a refused connection is never counted; with one
thread (``nbthread 1``) no two connections race between the check and the count.
"""
import dataclasses
import os
import re
import resource

from oslo_config import cfg

from vmcloud import exception
from vmcloud.conf import gateway as gateway_conf

PROTOCOLS = ('http', 'tcp')
FRONTENDS = {'http': 'fe_http', 'tcp': 'fe_tcp'}
# The map files, by what their values are; every key is a listener port.
MAP_SLOT = 'port-slot.map'
MAP_CLOUD = 'port-cloud.map'
MAP_CLOUD_LIMIT = 'port-cloud-limit.map'
MAP_APP = 'port-app.map'
MAP_APP_LIMIT = 'port-app-limit.map'
MAPS = (MAP_SLOT, MAP_CLOUD, MAP_CLOUD_LIMIT, MAP_APP, MAP_APP_LIMIT)
TABLE_CLOUDS = 'st_clouds'
TABLE_APPS = 'st_apps'
TABLE_REJECTS = 'st_rejects'
TABLE_CONNS = 'st_conns'
# A listener whose application has no limit: larger than any connection count.
NO_LIMIT = 2 ** 31 - 1
MAX_CONNECTIONS = 100000
# File descriptors HAProxy needs besides two per connection: listeners (one per port
# of both ranges), sockets, checks.
_SPARE_FDS = 4096
_PORT_RANGE = re.compile(r'^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$')


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where HAProxy's files are: all under ``[gateway] state_path``."""
    root: str

    @property
    def config(self) -> str:
        return os.path.join(self.root, 'haproxy.cfg')

    @property
    def admin_socket(self) -> str:
        return os.path.join(self.root, 'admin.sock')

    @property
    def master_socket(self) -> str:
        return os.path.join(self.root, 'master.sock')

    @property
    def pid(self) -> str:
        return os.path.join(self.root, 'haproxy.pid')

    @property
    def log(self) -> str:
        return os.path.join(self.root, 'haproxy.log')

    @property
    def maps(self) -> str:
        return os.path.join(self.root, 'maps')

    @property
    def counters(self) -> str:
        return os.path.join(self.root, 'counters.json')

    def map(self, name: str) -> str:
        """The file of map ``name`` (one of MAPS)."""
        if name not in MAPS:
            raise exception.GatewayError(f'no HAProxy map {name!r} (maps: {", ".join(MAPS)})')
        return os.path.join(self.maps, name)


def paths(conf: cfg.ConfigOpts) -> Paths:
    return Paths(gateway_conf.state_dir(conf))


def port_range(text: str, option: str) -> range:
    """The ports of a ``LOW-HIGH`` option value.

    :raises: ConfigError naming ``option`` if ``text`` is not one.
    """
    match = _PORT_RANGE.match(text or '')
    if match is None:
        raise exception.ConfigError(f'[gateway] {option} = {text!r}: expected LOW-HIGH, '
                                    f'e.g. 21000-21999')
    low, high = int(match.group(1)), int(match.group(2))
    if not 1 <= low <= high <= 65535:
        raise exception.ConfigError(f'[gateway] {option} = {text!r}: ports 1..65535, '
                                    f'LOW <= HIGH')
    return range(low, high + 1)


def listener_ports(conf: cfg.ConfigOpts) -> dict[str, range]:
    """Protocol -> the listener ports HAProxy binds for it.

    :raises: ConfigError if a range is malformed or the two overlap.
    """
    ports = {'http': port_range(conf.gateway.listener_ports, 'listener_ports'),
             'tcp': port_range(conf.gateway.tcp_listener_ports, 'tcp_listener_ports')}
    if set(ports['http']) & set(ports['tcp']):
        raise exception.ConfigError(
            f'[gateway] listener_ports ({conf.gateway.listener_ports}) and '
            f'tcp_listener_ports ({conf.gateway.tcp_listener_ports}) overlap')
    return ports


def slot_name(protocol: str, index: int) -> str:
    """The backend of slot ``index`` of ``protocol`` ('http' or 'tcp')."""
    if protocol not in PROTOCOLS:
        raise exception.GatewayError(f'unknown protocol {protocol!r} (http or tcp)')
    return f'{protocol}_slot{int(index)}'


def slot_names(conf: cfg.ConfigOpts, protocol: str) -> list[str]:
    return [slot_name(protocol, index) for index in range(conf.gateway.backend_slots)]


def default_maxconn() -> int:
    """The most connections HAProxy is told to hold: MAX_CONNECTIONS, or what this
    process's hard open file limit allows (two descriptors per proxied connection):
    HAProxy refuses to start if it cannot raise its limit to what maxconn needs, and
    a container's root cannot raise it past the hard limit either."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1000, min(MAX_CONNECTIONS, (hard - _SPARE_FDS) // 2))


def _bind(address: str, ports: range) -> str:
    # HAProxy takes the last ':' as the port's separator, so IPv6 needs no brackets.
    return f'{address}:{ports.start}-{ports.stop - 1}'


def _admission(paths: Paths) -> list[str]:
    """The tcp-request connection rules both frontends share: find the listener, check
    the limits, then count (in this order: a refused connection is never counted)."""
    def lookup(var: str, name: str, default: str = '') -> str:
        fallback = f',{default}' if default else ''
        return (f'tcp-request connection set-var(sess.{var}) '
                f'dst_port,map_int({paths.map(name)}{fallback})')

    return [
        lookup('slot', MAP_SLOT),
        '# A port no deployment holds: closed at once.',
        'tcp-request connection reject if !{ var(sess.slot) -m found }',
        lookup('cloud', MAP_CLOUD),
        lookup('cloud_limit', MAP_CLOUD_LIMIT),
        lookup('app', MAP_APP),
        '# An application without a limit is in port-app.map, not in its limit map.',
        lookup('app_limit', MAP_APP_LIMIT, str(NO_LIMIT)),
        'tcp-request connection set-var(sess.sport) src_port',
        'tcp-request connection set-var(sess.dport) dst_port',
        '# conn_cur - limit >= 0: at the limit already. table_conn_cur reads 0 for a key',
        '# not yet in the table; a plain deploy has no application, so no app_over.',
        f'tcp-request connection set-var(sess.cloud_over) '
        f'var(sess.cloud),table_conn_cur({TABLE_CLOUDS}),sub(sess.cloud_limit)',
        f'tcp-request connection set-var(sess.app_over) '
        f'var(sess.app),table_conn_cur({TABLE_APPS}),sub(sess.app_limit)',
        'acl cloud_over var(sess.cloud_over) -m int ge 0',
        'acl app_over var(sess.app_over) -m int ge 0',
        'acl has_app var(sess.app) -m found',
        f'tcp-request connection track-sc2 var(sess.cloud) table {TABLE_REJECTS} '
        f'if cloud_over || app_over',
    ]


def _counting() -> list[str]:
    return [
        f'tcp-request connection track-sc0 var(sess.cloud) table {TABLE_CLOUDS} '
        f'if !cloud_over !app_over',
        f'tcp-request connection track-sc1 var(sess.app) table {TABLE_APPS} '
        f'if has_app !cloud_over !app_over',
        f'tcp-request connection track-sc2 src,concat(:,sess.sport),concat(>,sess.dport) '
        f'table {TABLE_CONNS} if !cloud_over !app_over',
        '# gpt0 = accept time (sc-set-gpt is refused in tcp-request connection).',
        'tcp-request session sc-set-gpt(0,2) date if !cloud_over !app_over',
    ]


def _refusal_message(kind: str, var: str, limit: str) -> str:
    return (f'"vmcloud: {kind} %[var(sess.{var})] is at its connection limit '
            f'%[var(sess.{limit})]\\n"')


def _frontend_http(conf: cfg.ConfigOpts, paths: Paths, ports: range) -> list[str]:
    return [
        f'frontend {FRONTENDS["http"]}',
        'mode http',
        f'bind {_bind(conf.gateway.listen_address, ports)}',
        # A client has 10 s to send its request: a connection refused by the limit is
        # counted nowhere until its 503 is sent, and must not hold a socket an hour
        # long. Between requests an admitted one may idle as long as a TCP one.
        'timeout http-request 10s',
        'timeout http-keep-alive 1h',
        *_admission(paths),
        *_counting(),
        '# A refused HTTP client is told why, then the connection is closed.',
        'http-request return status 503 content-type text/plain lf-string '
        f'{_refusal_message("cloud", "cloud", "cloud_limit")} hdr Connection close '
        'if cloud_over',
        'http-request return status 503 content-type text/plain lf-string '
        f'{_refusal_message("application", "app", "app_limit")} hdr Connection close '
        'if app_over',
        '# An idle keep-alive connection is in no stream (show sess): its entry in',
        '# st_conns remembers the server that answered it last.',
        'http-response sc-set-gpt(1,2) srv_id,add(1)',
        'use_backend %[var(sess.slot)]',
    ]


def _frontend_tcp(conf: cfg.ConfigOpts, paths: Paths, ports: range) -> list[str]:
    return [
        f'frontend {FRONTENDS["tcp"]}',
        'mode tcp',
        f'bind {_bind(conf.gateway.listen_address, ports)}',
        *_admission(paths),
        'tcp-request connection reject if cloud_over || app_over',
        *_counting(),
        'use_backend %[var(sess.slot)]',
    ]


def _backends(conf: cfg.ConfigOpts, protocol: str) -> list[str]:
    lines = []
    for name in slot_names(conf, protocol):
        lines += [f'backend {name}', f'mode {protocol}', 'balance roundrobin',
                  # A connection refused by an instance that died since its last check
                  # goes to another one rather than failing.
                  'option redispatch', 'retries 2', '']
    return lines


def _tables() -> list[str]:
    return [
        f'backend {TABLE_CLOUDS}',
        'stick-table type string len 64 size 10k '
        'store conn_cur,conn_cnt,bytes_in_cnt,bytes_out_cnt',
        '',
        f'backend {TABLE_APPS}',
        'stick-table type string len 64 size 10k '
        'store conn_cur,conn_cnt,bytes_in_cnt,bytes_out_cnt',
        '',
        f'backend {TABLE_REJECTS}',
        'stick-table type string len 64 size 10k store conn_cnt',
        '',
        '# An entry outlives its connection by 10 s; gpt0 and gpt cannot share a table.',
        f'backend {TABLE_CONNS}',
        'stick-table type string len 64 size 200k expire 10s store conn_cur,gpt(2)',
        '',
    ]


def _indent(lines: list[str]) -> list[str]:
    """Indent the lines inside a section (from its header to the next empty line)."""
    indented, inside = [], False
    for line in lines:
        if line.startswith(('global', 'defaults', 'frontend ', 'backend ')):
            indented.append(line)
            inside = True
        elif not line:
            indented.append(line)
            inside = False
        else:
            indented.append(f'    {line}' if inside else line)
    return indented


def render(conf: cfg.ConfigOpts, paths: Paths, maxconn: int | None = None) -> str:
    """HAProxy's configuration for this gateway (``maxconn`` default: default_maxconn()).

    :raises: ConfigError if a listener port range is malformed or the ranges overlap.
    """
    ports = listener_ports(conf)
    maxconn = maxconn or default_maxconn()
    sections = [
        ['# Written by vmcloud gateway at start; everything else changes at runtime.',
         'global',
         '# One thread: the limit check and the counting are exact.',
         'nbthread 1',
         f'maxconn {maxconn}',
         f'stats socket {paths.admin_socket} level admin mode 600',
         'stats timeout 10s',
         ''],
        ['defaults',
         'timeout connect 5s',
         '# Applications hold long-lived connections (SSH, databases, websockets):',
         '# an idle one is not cut; TCP keepalives find a peer that is gone.',
         'timeout client 1h',
         'timeout server 1h',
         'timeout tunnel 1h',
         'option clitcpka',
         'option srvtcpka',
         'option dontlognull',
         f'maxconn {maxconn}',
         ''],
        _frontend_http(conf, paths, ports['http']) + [''],
        _frontend_tcp(conf, paths, ports['tcp']) + [''],
        _backends(conf, 'http'),
        _backends(conf, 'tcp'),
        _tables(),
    ]
    return '\n'.join(_indent([line for section in sections for line in section]))
