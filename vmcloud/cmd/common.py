"""What the commands that ask the dispatcher share: reaching it (over the bus, or through
the REST API), one request id per command, the boot and health arguments of a
deployment, waiting for one and showing it.

Each command first reaches the dispatcher within ``[DEFAULT] cli_timeout`` seconds,
the bus and then a ping, and fails naming what did not answer: an RPC call to a
dispatcher that is down would wait out the whole ``rpc_call_timeout`` (which a deploy
may need) before saying anything.

Given the REST API's URL (``--api-url`` or $VMCLOUD_API_URL), the commands that have a
REST counterpart ask it instead, with ``vmcloud.api.client.Client``: the same methods
with the same answers, so each command takes whichever ``client`` chooses.
"""
import argparse
import functools
import os
import sys
import threading

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.cmd import output
from vmcloud.compute import readiness
from vmcloud.dispatcher import rpcapi
from vmcloud.dispatcher import states

INSTANCE_COLUMNS = ('name', 'host', 'state', 'image', 'boot_seconds', 'reason')
PROTOCOLS = ('http', 'tcp')
# A deployment's fields that say where clients reach it (through the gateway).
EXPOSURE_FIELDS = ('cloud', 'application', 'listener_port', 'protocol', 'port')
# Where the REST API and its credentials come from when no option says.
API_URL_ENV = 'VMCLOUD_API_URL'
TOKEN_ENV = 'VMCLOUD_TOKEN'
USERNAME_ENV = 'VMCLOUD_USERNAME'
PASSWORD_ENV = 'VMCLOUD_PASSWORD'


def dispatcher_api(conf: cfg.ConfigOpts) -> rpcapi.DispatcherAPI:
    """The dispatcher's API, once a dispatcher answered a ping.

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable naming the bus;
        DispatcherUnavailable naming the bus and the topic if no dispatcher answers
        within ``cli_timeout`` s.
    """
    api = connect(conf)
    try:
        api.ping(timeout=conf.cli_timeout)
    except (exception.MessageBusUnreachable, exception.MessageBusRefused):
        raise
    except exception.MessagingError as exc:
        # Imported by rpc already, which silences the warnings its import prints.
        import oslo_messaging
        if not isinstance(exc.__cause__, oslo_messaging.MessagingTimeout):
            raise
        raise exception.DispatcherUnavailable(bus(conf), rpcapi.TOPIC,
                                              conf.cli_timeout) from exc
    return api


def client(conf: cfg.ConfigOpts, args: argparse.Namespace, rpc_client=None):
    """What a command asks: the REST API when ``args`` or the environment name one
    (see ``api_url``), else the dispatcher over the bus, ``rpc_client(conf)`` (by
    default ``dispatcher_api``: once it answered a ping).

    :raises: ConfigError (a bad URL, missing credentials), OSError (an unreadable
        password file), and whatever ``rpc_client`` raises.
    """
    url = api_url(args)
    if url is None:
        return (rpc_client or dispatcher_api)(conf)
    return rest_client(conf, url, args)


def api_url(args: argparse.Namespace) -> str | None:
    """``--api-url``, else $VMCLOUD_API_URL, else None (the bus)."""
    return getattr(args, 'api_url', None) or os.environ.get(API_URL_ENV) or None


def rest_client(conf: cfg.ConfigOpts, url: str, args: argparse.Namespace):
    """The REST API's client at ``url``, with $VMCLOUD_TOKEN, or $VMCLOUD_USERNAME and
    its password (``--password-file``, else $VMCLOUD_PASSWORD). An answer may take
    ``rpc_call_timeout`` s, as the dispatcher's does; reaching the API ``cli_timeout``.

    :raises: ConfigError naming the URL and what is missing; OSError.
    """
    # Imported here: httpx is of no use to a command that goes over the bus.
    from vmcloud.api import client as api_client

    token = os.environ.get(TOKEN_ENV) or None
    username = os.environ.get(USERNAME_ENV) or None
    password = api_password(args)
    if not token and not username:
        raise exception.ConfigError(
            f'the vmcloud API at {url} needs credentials: ${TOKEN_ENV}, or ${USERNAME_ENV} '
            f'with ${PASSWORD_ENV} or --password-file')
    if username and not password and not token:
        raise exception.ConfigError(
            f'user {username} needs a password for the vmcloud API at {url}: '
            f'${PASSWORD_ENV} or --password-file')
    return api_client.Client(url, token=token, username=username, password=password,
                             timeout=conf.rpc_call_timeout, connect_timeout=conf.cli_timeout)


def api_password(args: argparse.Namespace) -> str | None:
    """The first line of ``--password-file``, else $VMCLOUD_PASSWORD, else None.

    :raises: ConfigError if the file holds none; OSError if it cannot be read.
    """
    path = getattr(args, 'api_password_file', None)
    if path is None:
        return os.environ.get(PASSWORD_ENV) or None
    with open(path) as f:
        password = f.readline().rstrip('\r\n')
    if not password:
        raise exception.ConfigError(f'password file {path} holds no password on its '
                                    'first line')
    return password


def bus(conf: cfg.ConfigOpts) -> str:
    """The bus as errors name it, its passwords masked."""
    url = conf.transport_url or 'rabbit://'
    if url.rstrip('/') == 'rabbit:':
        # The driver's default: say where that is, 'rabbit://' alone does not.
        return f'{url} (guest@localhost:5672)'
    return rpc.masked_url(url)


def connect(conf: cfg.ConfigOpts) -> rpcapi.DispatcherAPI:
    """The client, its bus reached within ``cli_timeout`` s.

    Connecting is bounded in attempts (rpc_connect_retries), not in time: a bus whose
    host drops packets or never answers costs kombu's connect timeout per attempt, and
    a host name lookup has no timeout at all. The attempts run in a thread left behind
    when the time is up; the command exits right after.

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable.
    """
    outcome: dict = {}

    def attempt() -> None:
        try:
            outcome['api'] = rpcapi.DispatcherAPI(conf)
        except BaseException as exc:  # re-raised in the command's thread
            outcome['error'] = exc
    worker = threading.Thread(target=rpc.with_current_request(attempt), daemon=True,
                              name='vmcloud-connect')
    worker.start()
    worker.join(conf.cli_timeout)
    if worker.is_alive():
        raise exception.MessageBusUnreachable(
            f'cannot reach the message bus at {bus(conf)} within {conf.cli_timeout} s '
            '([DEFAULT] cli_timeout)')
    if 'error' in outcome:
        raise outcome['error']
    return outcome['api']


def one_request(handler):
    """``handler`` with every call it makes carrying one request id, which the
    services' log lines show."""
    @functools.wraps(handler)
    def run(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        with rpc.request_context():
            return handler(conf, args)
    return run


# -- arguments ---------------------------------------------------------------------

def format_parent() -> argparse.ArgumentParser:
    """``-f table|json``, which every command takes."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('-f', dest='fmt', choices=('table', 'json'), default='table')
    return parent


def waiting_parent() -> argparse.ArgumentParser:
    """``--wait``, ``--timeout`` and ``--progress`` of a command that may wait."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('--wait', action='store_true',
                        help='wait until it is done (its id is printed on stderr first)')
    parent.add_argument('--timeout', type=float, default=600, help='seconds --wait waits')
    parent.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None)
    return parent


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--vcpus', type=int, default=1)
    parser.add_argument('--memory', type=int, default=256, help='MiB per instance')


def add_boot_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kernel``, ``--initrd``, ``--cmdline`` (read back by ``boot``)."""
    parser.add_argument('--kernel', metavar='IMAGE[:VERSION]|/PATH',
                        help='boot this kernel directly: a warehouse image (pinned to its '
                             'current version at deploy; each compute node fetches it '
                             'once), or an absolute path of a file that exists on every '
                             'compute node')
    parser.add_argument('--initrd', metavar='IMAGE[:VERSION]|/PATH',
                        help='initrd for --kernel, named the same two ways')
    parser.add_argument('--cmdline', help="kernel command line; '{name}' is the instance "
                                          'name')


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    """``--health``, ``--health-timeout`` (read back by ``health``)."""
    parser.add_argument('--health', type=health_check, metavar='CHECK',
                        help='when an instance is ready (built): tcp:PORT (a connection to '
                             'it opens), http:PORT[/PATH] (a GET answers below 500), '
                             'console:REGEX (a console line matches), or marker (the image '
                             'prints VMCLOUD-PHASE boot-done; the default)')
    parser.add_argument('--health-timeout', type=float, metavar='SECONDS',
                        help='seconds an instance gets to pass it (default: [compute] '
                             'boot_timeout of its host)')


def boot(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (('kernel', args.kernel), ('initrd', args.initrd),
                              ('cmdline', args.cmdline)) if v}


def health_check(text: str) -> dict:
    """``--health``'s value as the dispatcher takes it (see ``readiness.parse``).

    :raises: argparse.ArgumentTypeError naming the value and the syntax.
    """
    try:
        return readiness.parse(text)
    except exception.InvalidRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def health(args: argparse.Namespace) -> dict:
    checked = dict(args.health or readiness.DEFAULT)
    if args.health_timeout is not None:
        checked['timeout'] = args.health_timeout
    return checked


def health_timeout_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with ``--health-timeout``, if anything (for parser.error)."""
    if args.health_timeout is not None and not args.health_timeout > 0:
        return '--health-timeout must be above 0'
    return None


def port_number(text: str) -> int:
    """A TCP port, 1..65535. :raises: argparse.ArgumentTypeError naming the value."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port '{text}' is not a number 1-65535")
    return port


def connection_limit(text: str) -> int:
    """A connection limit, at least 1. :raises: argparse.ArgumentTypeError naming it."""
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise argparse.ArgumentTypeError(
            f"connection limit '{text}' is not a whole number of at least 1")
    return limit


# -- waiting and showing ----------------------------------------------------------------

def say_waiting(what: str, ident: str, timeout: float, look: str) -> None:
    """Say what is waited for, and how to look at it, before waiting: if the wait
    fails, the id is on the terminal already."""
    print(f'vmcloud: {what} {ident}: waiting up to {timeout:g} s (`{look}` shows it)',
          file=sys.stderr, flush=True)


def timed_out(error: exception.WaitTimedOut, look: str) -> exception.WaitTimedOut:
    return exception.WaitTimedOut(f'{error}; it goes on: `{look}` shows it')


def wait_deployment(api: rpcapi.DispatcherAPI, deployment: dict,
                    args: argparse.Namespace) -> dict:
    """:raises: WaitTimedOut naming the deployment and the command that shows it."""
    ident = deployment['id']
    look = f'vmcloud show {ident}'
    say_waiting('deployment', ident, args.timeout, look)
    bar = output.ProgressBar(f'deploying {ident[:8]}', unit='instances',
                             enabled=args.progress)

    def progress(current: dict) -> None:
        bar(sum(1 for i in current['instances'] if i['state'] != states.BUILDING),
            len(current['instances']))
    try:
        return api.wait_deployment(ident, args.timeout, progress)
    except exception.WaitTimedOut as exc:
        raise timed_out(exc, look) from exc
    finally:
        bar.close()


def deployed(deployment: dict) -> int:
    """The exit status of a command that deployed (and maybe waited for) ``deployment``."""
    return 0 if deployment['state'] in states.RUNNING_STATES else 1


def show_nested(record: dict, rows: str, columns: tuple, fmt: str) -> None:
    """``record`` with its list ``rows`` as a table below it (json: all as one)."""
    if fmt == 'json':
        output.emit_record(record, fmt)
        return
    output.emit_record({k: v for k, v in record.items() if k != rows}, fmt)
    # (a deleted deployment, as the REST API answers its deletion, may list none)
    output.emit(record.get(rows) or [], columns, fmt)


def show_deployment(deployment: dict, fmt: str) -> None:
    """A deployment, its instances below it; in a table, its cloud, application and
    listener port come first, as they are where clients reach it."""
    if fmt != 'json':
        first = {k: deployment[k] for k in EXPOSURE_FIELDS if k in deployment}
        deployment = {**{k: v for k, v in deployment.items() if k in ('id', 'state')},
                      **first, **deployment}
    show_nested(deployment, 'instances', INSTANCE_COLUMNS, fmt)
