"""HAProxy, the gateway's proxy: its process and its runtime API.

The process is started once (``haproxy -W -D``: master-worker, daemonized in a session of
its own) and outlives ``vmcloud gateway``: a gateway restarting adopts it, and the
clients' established connections keep working. Its configuration never changes after
start (see vmcloud.gateway.config); the gateway programs it through the admin socket:
dynamic servers in the backend slots, the maps of the listener ports, and reads the
stick tables, the streams and the statistics back.

The maps are the listener table: every change is made at runtime and then written to
its file under ``maps/`` (atomically), so an HAProxy started again loads the same
listeners before the gateway has programmed anything.
"""
import contextlib
import csv
import dataclasses
import io
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time

from oslo_config import cfg

from vmcloud import exception
from vmcloud.gateway import config
from vmcloud.storage import durable

LOG = logging.getLogger(__name__)

# One runtime command gets this long to be answered.
COMMAND_TIMEOUT = 5.0
# HAProxy gets this long to check and load its config and answer on its admin socket.
START_TIMEOUT = 15.0
# HAProxy gets this long to exit after SIGTERM, then again after SIGKILL.
STOP_TIMEOUT = 5.0
_POLL = 0.02
# The first line of an answer that is a refusal (HAProxy's CLI answers in plain text,
# with no status).
_ERROR = re.compile(
    r"^(Unknown command|No such|Can't|Cannot|Unknown map|Key not found|entry not found|"
    r"Require|Permission denied|Missing|Invalid|Unable|Already exists|Server still has|"
    r"Absolute weight|Relative weight|Error|error)")
# Server admin_state bits (srv_admin_state of 'show servers state').
ADMIN_MAINTENANCE = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20
OP_STATE_RUNNING = 2


@dataclasses.dataclass(frozen=True)
class Server:
    """One server of a backend, as 'show servers state' tells it."""
    backend: str
    id: int
    name: str
    address: str
    port: int
    op_state: int       # 0 stopped (checks fail), 1 starting, 2 running, 3 stopping
    admin_state: int    # bits: maintenance (forced, inherited, by DNS...), draining
    weight: int         # the weight in use (srv_uweight)
    check_status: int

    @property
    def up(self) -> bool:
        """Its checks pass."""
        return self.op_state == OP_STATE_RUNNING

    @property
    def enabled(self) -> bool:
        """Not in maintenance: it takes connections when up."""
        return not self.admin_state & ADMIN_MAINTENANCE


class HAProxy:
    """The gateway's HAProxy process and runtime client.

    Thread-safe: each command is one connection to the admin socket; map changes
    (runtime and file) are made under one lock.
    """

    def __init__(self, conf: cfg.ConfigOpts):
        self.conf = conf
        self.paths = config.paths(conf)
        self.binary = conf.gateway.haproxy_binary
        self._maps_lock = threading.Lock()

    # -- process -------------------------------------------------------------------

    def start(self) -> None:
        """Write the config and the map files that are missing, check the config, start
        HAProxy and wait until its admin socket answers.

        :raises: HAProxyError naming HAProxy's output if the config check fails, HAProxy
            exits, or the socket does not answer within START_TIMEOUT; also if an
            HAProxy of this state path runs already (adopt it instead).
        """
        if self.alive():
            raise exception.HAProxyError(
                'start', f'HAProxy {self._pid()} of {self.paths.root} is running already')
        self._kill_orphans()
        self._write_files()
        self._check_config()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.pid)
        argv = [self.binary, '-W', '-D', '-S', self.paths.master_socket,
                '-f', self.paths.config, '-p', self.paths.pid]
        with open(self.paths.log, 'ab') as log:
            # -D: the parent exits once the master is daemonized (its own session, child
            # of init, so it outlives us and leaves no zombie), after binding the ports.
            try:
                result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, timeout=START_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                # Not there, not runnable, or stuck before daemonizing: nothing half
                # started is left holding the ports.
                self._kill_orphans()
                raise exception.HAProxyError(' '.join(argv), str(exc)) from exc
        if result.returncode != 0:
            raise exception.HAProxyError(' '.join(argv), self._log_tail())
        self._wait_until_answering(argv)
        LOG.info('started HAProxy %s (config %s)', self._pid(), self.paths.config)

    def _kill_orphans(self) -> None:
        """Kill the workers a dead master left: they would hold the ports."""
        pid = self._pid()
        if pid is not None and self._group(pid):
            LOG.warning('HAProxy %s is gone, its workers %s are not: killing them',
                        pid, self._group(pid))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            if not self._wait_gone(pid, STOP_TIMEOUT):
                raise exception.HAProxyError(
                    'start', f'workers {self._group(pid)} of HAProxy {pid} survived SIGKILL')

    def _write_files(self) -> None:
        os.makedirs(self.paths.maps, exist_ok=True)
        for name in config.MAPS:
            # Kept: they are the listeners of the last run, loaded again at start.
            if not os.path.exists(self.paths.map(name)):
                durable.replace(self.paths.map(name), b'')
        durable.replace(self.paths.config,
                        (config.render(self.conf, self.paths) + '\n').encode())

    def _check_config(self) -> None:
        argv = [self.binary, '-c', '-f', self.paths.config]
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                    timeout=START_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise exception.HAProxyError(' '.join(argv), str(exc)) from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode('utf-8', 'replace')
            raise exception.HAProxyError(' '.join(argv), output)

    def _wait_until_answering(self, argv: list[str]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.command('show info')
                return
            except exception.HAProxyError as exc:
                if not self.alive():
                    raise exception.HAProxyError(' '.join(argv),
                                                 f'exited: {self._log_tail()}') from exc
                if time.monotonic() > deadline:
                    raise exception.HAProxyError(
                        ' '.join(argv), f'no answer on {self.paths.admin_socket} within '
                        f'{START_TIMEOUT:g} s: {exc.answer}') from exc
            time.sleep(_POLL)

    def _log_tail(self, size: int = 4000) -> str:
        try:
            with open(self.paths.log, 'rb') as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def adopt(self) -> bool:
        """Whether an HAProxy of this state path runs (pid file) and answers on its admin
        socket: then this object drives it, and start() is not needed."""
        if not self.alive():
            return False
        try:
            self.command('show info')
        except exception.HAProxyError as exc:
            LOG.warning('HAProxy %s runs but does not answer: %s', self._pid(), exc)
            return False
        LOG.info('adopted HAProxy %s (config %s)', self._pid(), self.paths.config)
        return True

    def _pid(self) -> int | None:
        try:
            with open(self.paths.pid) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def alive(self) -> bool:
        """Whether HAProxy's master process of this state path runs."""
        pid = self._pid()
        return pid is not None and self._is_ours(pid)

    def _is_ours(self, pid: int) -> bool:
        # A pid file outlives its process, and the pid may be another's since.
        try:
            with open(f'/proc/{pid}/stat') as f:
                state = f.read().rsplit(')', 1)[1].split()[0]
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                argv = f.read().split(b'\0')
        except OSError:
            return False
        return state not in ('Z', 'X') and self.paths.master_socket.encode() in argv

    def stop(self) -> None:
        """Stop HAProxy, its master and workers (SIGTERM, then SIGKILL to its process
        group): every connection through it is cut. Nothing happens if it is not running.

        :raises: HAProxyError if a process of it is still there after SIGKILL.
        """
        pid = self._pid()
        if pid is None or not self._is_ours(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        # The master exits before its workers do: a worker still answers on the admin
        # socket and holds the ports until it is gone too.
        if not self._wait_gone(pid, STOP_TIMEOUT):
            LOG.warning('HAProxy %s ignored SIGTERM for %g s: killing it', pid, STOP_TIMEOUT)
            # -D made the master a session and group leader; its workers are in it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            if not self._wait_gone(pid, STOP_TIMEOUT):
                raise exception.HAProxyError('stop', f'HAProxy {pid} survived SIGKILL')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.pid)
        LOG.info('stopped HAProxy %s', pid)

    def _group(self, pgid: int) -> list[int]:
        """The processes of ours (master, workers) in process group ``pgid``."""
        members = []
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and self._is_ours(int(entry)):
                members.append(int(entry))
        return members

    def _wait_gone(self, pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._group(pgid):
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL)
        return True

    def run_id(self) -> str:
        """This HAProxy run: its worker's pid and start time (clock ticks since boot),
        different after any restart, also one that gets the same pid.

        :raises: HAProxyError if it does not answer.
        """
        pid = int(self.info()['Pid'])
        try:
            with open(f'/proc/{pid}/stat') as f:
                started = f.read().rsplit(')', 1)[1].split()[19]
        except (OSError, IndexError) as exc:
            raise exception.HAProxyError('show info', f'worker {pid} is gone: {exc}') from exc
        return f'{pid}-{started}'

    # -- runtime API ---------------------------------------------------------------

    def command(self, line: str) -> str:
        """One command on the admin socket; its answer.

        :raises: HAProxyError naming the command and the answer if HAProxy refuses it,
            or if it does not answer within COMMAND_TIMEOUT.
        """
        if '\n' in line or ';' in line:
            raise exception.HAProxyError(line, 'one command, without newline or ";"')
        answer = self._exchange(line)
        first = answer.lstrip('\n').split('\n', 1)[0]
        if _ERROR.match(first):
            raise exception.HAProxyError(line, answer)
        return answer

    def _exchange(self, line: str) -> str:
        chunks = []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(COMMAND_TIMEOUT)
                sock.connect(self.paths.admin_socket)
                sock.sendall(line.encode() + b'\n')
                # Not interactive: HAProxy answers, then closes.
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise exception.HAProxyError(line, f'{self.paths.admin_socket}: {exc}') from exc
        return b''.join(chunks).decode('utf-8', 'replace')

    def _expect(self, line: str, *accepted: str) -> None:
        answer = self.command(line)
        if answer.strip() not in accepted:
            raise exception.HAProxyError(line, answer)

    # -- servers -------------------------------------------------------------------

    def add_server(self, backend: str, name: str, address: str, port: int, weight: int,
                   check_interval_ms: int | None = None) -> None:
        """Add an enabled server with a TCP check: it takes connections once a check
        passes (rise 1) and none after two fail in a row (fall 2).

        :raises: HAProxyError if HAProxy refuses (no such backend, name taken, bad
            address or weight); the server is then not there.
        """
        interval = check_interval_ms or self.conf.gateway.check_interval_ms
        self._expect(f'add server {backend}/{name} {address}:{int(port)} '
                     f'weight {int(weight)} check inter {int(interval)}ms fall 2 rise 1 '
                     # A dynamic server keeps no idle connection to reuse unless told
                     # (HAProxy 2.6 gives it 0 for both, static servers -1 and 5s): without
                     # them every HTTP request opens a new connection to the instance,
                     # at a third of the throughput (benchmarks/gateway.py).
                     'pool-max-conn -1 pool-purge-delay 5s',
                     'New server registered.')
        try:
            # A dynamic server starts in maintenance with its check off.
            self._expect(f'enable health {backend}/{name}', '')
            self._expect(f'enable server {backend}/{name}', '')
        except exception.HAProxyError:
            with contextlib.suppress(exception.HAProxyError):
                self.del_server(backend, name)
            raise

    def enable_server(self, backend: str, name: str) -> None:
        """:raises: HAProxyError if there is no such server."""
        self._expect(f'enable server {backend}/{name}', '')

    def disable_server(self, backend: str, name: str) -> None:
        """Put it in maintenance: it takes no new connection, its own keep going.

        :raises: HAProxyError if there is no such server."""
        self._expect(f'disable server {backend}/{name}', '')

    def set_weight(self, backend: str, name: str, weight: int) -> None:
        """:raises: HAProxyError if there is no such server or ``weight`` is not 0..256."""
        self._expect(f'set server {backend}/{name} weight {int(weight)}', '')

    def del_server(self, backend: str, name: str) -> None:
        """Disable and delete a server.

        :raises: HAProxyError if there is no such server or it still has connections
            (see server_connections; it is then left disabled).
        """
        self.disable_server(backend, name)
        self._expect(f'del server {backend}/{name}', 'Server deleted.')

    def servers(self, backend: str) -> dict[str, Server]:
        """Name -> server of ``backend``.

        :raises: HAProxyError if there is no such backend.
        """
        answer = self.command(f'show servers state {backend}')
        return {row['srv_name']: Server(
            backend=row['be_name'], id=int(row['srv_id']), name=row['srv_name'],
            address=row['srv_addr'], port=int(row['srv_port']),
            op_state=int(row['srv_op_state']), admin_state=int(row['srv_admin_state']),
            weight=int(row['srv_uweight']), check_status=int(row['srv_check_status']))
            for row in _header_rows(answer, skip=1)}

    def server_connections(self, backend: str) -> dict[str, int]:
        """Name -> connections the server of ``backend`` holds (in use and idle): a
        server can be deleted once it holds none.

        :raises: HAProxyError if there is no such backend.
        """
        counts = {}
        for row in _header_rows(self.command(f'show servers conn {backend}')):
            name = row['bkname/svname'].split('/', 1)[1]
            counts[name] = int(row['used_cur']) + int(row['idle_cur'])
        return counts

    # -- maps: the listener table --------------------------------------------------

    def set_map_entry(self, name: str, key: str | int, value: str | int) -> None:
        """Map ``key`` to ``value`` in map ``name`` (one of config.MAPS), in HAProxy and
        in its file.

        :raises: HAProxyError if HAProxy refuses or the file cannot be written.
        """
        path = self.paths.map(name)
        key, value = _map_token(key), _map_token(value)
        with self._maps_lock:
            try:
                # 'add map' would add a second entry for a key already there.
                self._expect(f'set map {path} {key} {value}', '')
            except exception.HAProxyError as exc:
                if not exc.answer.strip().startswith('entry not found'):
                    raise
                self._expect(f'add map {path} {key} {value}', '')
            entries = _read_map(path)
            entries[key] = value
            self._write_map(path, entries)

    def del_map_entry(self, name: str, key: str | int) -> None:
        """Remove ``key`` from map ``name``, in HAProxy and in its file; nothing if it is
        not there.

        :raises: HAProxyError if HAProxy refuses or the file cannot be written.
        """
        path = self.paths.map(name)
        key = _map_token(key)
        with self._maps_lock:
            try:
                self._expect(f'del map {path} {key}', '')
            except exception.HAProxyError as exc:
                if not exc.answer.strip().startswith('Key not found'):
                    raise
            entries = _read_map(path)
            if entries.pop(key, None) is not None:
                self._write_map(path, entries)

    def map_entries(self, name: str) -> dict[str, str]:
        """Key -> value of map ``name`` as HAProxy holds it.

        :raises: HAProxyError if it does not answer.
        """
        entries = {}
        for line in self.command(f'show map {self.paths.map(name)}').splitlines():
            fields = line.split()
            if len(fields) == 3:
                entries[fields[1]] = fields[2]
        return entries

    def _write_map(self, path: str, entries: dict[str, str]) -> None:
        text = ''.join(f'{key} {value}\n' for key, value in sorted(entries.items()))
        try:
            durable.replace(path, text.encode())
        except OSError as exc:
            raise exception.HAProxyError(f'write {path}', str(exc)) from exc

    # -- reading ---------------------------------------------------------------------

    def show_table(self, name: str, filter: str | None = None) -> list[dict]:
        """The entries of stick table ``name``, each ``{'key': str, <counter>: int}``
        (see parse_table_entry); ``filter`` is HAProxy's, e.g. 'data.conn_cur gt 0'.

        :raises: HAProxyError if there is no such table or the filter is refused.
        """
        line = f'show table {name}' + (f' {filter}' if filter else '')
        return [parse_table_entry(text) for text in self.command(line).splitlines()
                if text.startswith('0x')]

    def sessions(self) -> list[dict]:
        """The streams HAProxy holds, each ``{'proto', 'src', 'fe', 'be', 'srv', ...}``
        as 'show sess' tells them (the CLI's own included, fe 'GLOBAL')."""
        return [parse_session(text) for text in self.command('show sess').splitlines()
                if text.startswith('0x')]

    def stat(self) -> list[dict]:
        """'show stat': one dict per frontend, backend and server (CSV columns: pxname,
        svname, scur, stot, status, weight, ...)."""
        answer = self.command('show stat').lstrip('# ')
        return [row for row in csv.DictReader(io.StringIO(answer)) if row.get('pxname')]

    def info(self) -> dict[str, str]:
        """'show info': Pid, Uptime_sec, CurrConns, Maxconn, ..."""
        fields = {}
        for line in self.command('show info').splitlines():
            key, sep, value = line.partition(':')
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    # The names the contract uses.
    show_servers = servers
    show_sess = sessions
    show_stat = stat
    set_map = set_map_entry
    del_map = del_map_entry


def _map_token(value: str | int) -> str:
    text = str(value)
    if not text or any(c.isspace() for c in text) or ';' in text:
        raise exception.HAProxyError('map', f'{text!r}: map keys and values are one '
                                     f'word')
    return text


def _read_map(path: str) -> dict[str, str]:
    entries = {}
    with contextlib.suppress(FileNotFoundError):
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) == 2:
                    entries[fields[0]] = fields[1]
    return entries


def _header_rows(answer: str, skip: int = 0) -> list[dict[str, str]]:
    """The rows of an answer whose (first after ``skip`` lines) '# a b c' line names the
    space-separated columns."""
    lines = [line for line in answer.splitlines()[skip:] if line.strip()]
    if not lines or not lines[0].startswith('#'):
        return []
    columns = lines[0].lstrip('# ').split()
    return [dict(zip(columns, line.split())) for line in lines[1:]]


_TABLE_FIELD = re.compile(r'(\w+)=(\S+)')
_INT = re.compile(r'^-?\d+$')


def parse_table_entry(line: str) -> dict:
    """One line of 'show table', e.g. '0x55..: key=1.2.3.4:5>6 use=1 exp=9000
    conn_cur=1 gpt0=1700000000 gpt1=3' -> {'key': '1.2.3.4:5>6', 'use': 1, 'exp': 9000,
    'conn_cur': 1, 'gpt0': 1700000000, 'gpt1': 3}."""
    entry = {}
    for name, value in _TABLE_FIELD.findall(line.split(':', 1)[1]):
        entry[name] = int(value) if name != 'key' and _INT.match(value) else value
    return entry


def parse_session(line: str) -> dict:
    """One line of 'show sess': its leading 'name=value' fields (up to the buffers')."""
    session = {'id': line.split(':', 1)[0]}
    for token in line.split(':', 1)[1].split():
        name, sep, value = token.partition('=')
        if not sep or '[' in name:
            break
        session[name] = value
    return session
