"""When a new guest is ready: the check its deployment names, polled until it passes.

A deployment says how its guests show they are ready (its ``health``): the boot-done
marker vmcloud's images print (``marker``, the default), a console line of the image's
own (``console``), or a service answering on the instance's address (``tcp``,
``http``). The services are probed from the host's side of the guest network, by the
host's network agent (the Linux one probes from inside the network's DHCP namespace, the
one place of the host that reaches the guests: see ``vmcloud.network.probe``). So an
image that prints nothing of vmcloud's is ready once its application answers, and the
compute manager takes that moment as the end of its boot phase (``phases.follow``).
"""
import re
import time

from vmcloud import exception
from vmcloud.drivers import base as driver_base

MARKER, CONSOLE, TCP, HTTP = 'marker', 'console', 'tcp', 'http'
KINDS = (MARKER, CONSOLE, TCP, HTTP)
DEFAULT = {'kind': MARKER}
SYNTAX = 'tcp:PORT | http:PORT[/PATH] | console:REGEX | marker'

# The console's last characters shown when a console check fails: what the guest said.
_TAIL_CHARS = 200


def check(health: dict | None) -> dict:
    """``health`` as a request carries it, checked: ``{'kind': 'marker'}``, ``{'kind': 'tcp',
    'port': 80}``, ``{'kind': 'http', 'port': 80, 'path': '/'}`` or ``{'kind': 'console',
    'pattern': REGEX}``, each with an optional ``timeout`` (seconds). None or {} is marker.

    :returns: a copy, http's path defaulting to '/'.
    :raises: InvalidRequest naming what is wrong.
    """
    if not health:
        return dict(DEFAULT)
    if not isinstance(health, dict):
        raise exception.InvalidRequest(f'a health check is a dict, not {health!r}')
    kind = health.get('kind')
    if kind not in KINDS:
        raise exception.InvalidRequest(
            f'health check kind {kind!r} is not one of {", ".join(KINDS)}')
    fields = {MARKER: set(), CONSOLE: {'pattern'}, TCP: {'port'},
              HTTP: {'port', 'path'}}[kind] | {'kind', 'timeout'}
    unknown = set(health) - fields
    if unknown:
        raise exception.InvalidRequest(
            f'the {kind} health check has no {", ".join(sorted(unknown))}')
    checked = dict(health)
    if 'timeout' in health:
        timeout = health['timeout']
        if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                or not timeout > 0):
            raise exception.InvalidRequest(
                f'the health check timeout must be a number of seconds above 0, not '
                f'{timeout!r}')
    if kind in (TCP, HTTP):
        port = health.get('port')
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise exception.InvalidRequest(
                f'the {kind} health check needs a port 1-65535, not {port!r}')
    if kind == HTTP:
        path = checked.setdefault('path', '/')
        if not isinstance(path, str) or not path.startswith('/') or any(
                c.isspace() for c in path):
            raise exception.InvalidRequest(
                f'the http health check path must start with / and hold no space, not '
                f'{path!r}')
    if kind == CONSOLE:
        pattern = health.get('pattern')
        if not isinstance(pattern, str) or not pattern:
            raise exception.InvalidRequest('the console health check needs a pattern')
        try:
            re.compile(pattern)
        except re.error as exc:
            raise exception.InvalidRequest(
                f'the console health check pattern {pattern!r} is no regular expression: '
                f'{exc}') from exc
    return checked


def parse(text: str) -> dict:
    """The command line's form (``SYNTAX``) as check() takes it.

    :raises: InvalidRequest naming the value and the syntax.
    """
    kind, sep, rest = text.partition(':')
    try:
        if kind == MARKER and not sep:
            return check({'kind': MARKER})
        if kind == CONSOLE and sep:
            return check({'kind': CONSOLE, 'pattern': rest})
        if kind in (TCP, HTTP) and sep:
            port, slash, path = rest.partition('/')
            if kind == TCP and slash:
                raise exception.InvalidRequest('a tcp check has no path')
            if not port.isdigit():
                raise exception.InvalidRequest(f'the port {port!r} is not a number')
            health = {'kind': kind, 'port': int(port)}
            if kind == HTTP:
                health['path'] = slash + path or '/'
            return check(health)
    except exception.InvalidRequest as exc:
        raise exception.InvalidRequest(f'health check {text!r}: {exc} ({SYNTAX})') from exc
    raise exception.InvalidRequest(f'health check {text!r} is not one of {SYNTAX}')


def describe(health: dict) -> str:
    """The check as the command line writes it, for messages: ``http:80/ready``."""
    kind = health.get('kind', MARKER)
    if kind == CONSOLE:
        return f'console:{health.get("pattern")}'
    if kind == TCP:
        return f'tcp:{health.get("port")}'
    if kind == HTTP:
        return f'http:{health.get("port")}{health.get("path", "/")}'
    return str(kind)


def wait_ready(driver: driver_base.Driver, agent, name: str, health: dict,
               network_id: str | None, address: str | None, timeout: float) -> float:
    """Wait until guest ``name`` passes its ``health`` check (see check()).

    ``marker``: the driver sees the guest's boot-done marker; ``console``: a line of its
    console matches the pattern; ``tcp``: a connection to ``address``:port opens from
    the host's side of network ``network_id`` (``agent.tcp_connect``); ``http``: a GET
    of the path there (``agent.http_get``) answers a status below 500 (an application
    that answers at all is up, even if it refuses the path).
    Polled every ``[network] health_interval`` s, each probe bounded by ``[network]
    health_probe_timeout`` and by what is left of ``timeout``. ``agent`` is the host's
    network agent, None when the guest is on no network: a tcp or http check needs one.

    :returns: the seconds it took.
    :raises: InvalidRequest for a malformed check, or a tcp/http check of a guest on no
        network; NotSupported for a console check on a driver without a console;
        GuestTimeout naming the instance, the check and the last probe's error when
        ``timeout`` s passed, at once when the guest stops; InstanceNotFound if the
        guest went away.
    """
    health = check(health)
    started = time.monotonic()
    deadline = started + timeout
    what = describe(health)
    if health['kind'] == MARKER:
        try:
            driver.wait_for_event(name, driver_base.BOOT_DONE, timeout)
        except exception.GuestTimeout as exc:
            raise exception.GuestTimeout(
                f'instance {name} did not pass its {what} check: {exc}') from exc
        return time.monotonic() - started
    if health['kind'] == CONSOLE:
        if not driver.has(driver_base.Capability.CONSOLE_LOG):
            raise exception.NotSupported(driver.name,
                                         f'read the console for the {what} check')
        attempt = _console_attempt(driver, name, re.compile(health['pattern'], re.MULTILINE))
    else:
        if agent is None or not network_id or not address:
            raise exception.InvalidRequest(
                f'the {what} check of instance {name} needs it on a network')
        attempt = _probe_attempt(driver.conf, agent, health, network_id, address)
    interval = driver.conf.network.health_interval
    while True:
        error = attempt(deadline)
        if error is None:
            return time.monotonic() - started
        # After the probe: a guest that stopped while it ran is told at once, too.
        if driver.power_state(name) == driver_base.PowerState.SHUTDOWN:
            raise exception.GuestTimeout(
                f'instance {name} stopped before it passed its {what} check; last error: '
                f'{error}')
        left = deadline - time.monotonic()
        if left <= 0:
            raise exception.GuestTimeout(
                f'instance {name} did not pass its {what} check within {timeout:g} s; '
                f'last error: {error}')
        time.sleep(min(interval, left))


def _console_attempt(driver: driver_base.Driver, name: str, regex: re.Pattern):
    """:returns: attempt(deadline) -> None once a console line matches, else why not."""
    def attempt(deadline: float) -> str | None:
        text = driver.console_log(name)
        if regex.search(text):
            return None
        tail = ' | '.join(line for line in text[-_TAIL_CHARS:].splitlines() if line.strip())
        return f'no console line matches {regex.pattern!r}; it ends with: {tail or "(nothing)"}'
    return attempt


def _probe_attempt(conf, agent, health: dict, network_id: str, address: str):
    """:returns: attempt(deadline) -> None once the probe succeeds, else its error."""
    port = health['port']

    def attempt(deadline: float) -> str | None:
        # Never past the deadline: a probe that hangs must not stretch the build's timeout.
        limit = max(0.05, min(conf.network.health_probe_timeout, deadline - time.monotonic()))
        try:
            if health['kind'] == TCP:
                agent.tcp_connect(network_id, address, port, limit)
                return None
            status, _body = agent.http_get(network_id, address, port, health['path'],
                                           limit)
        except exception.NetworkError as exc:
            return str(exc)
        if status < 500:
            return None
        return f'http://{address}:{port}{health["path"]} answered {status}'
    return attempt
