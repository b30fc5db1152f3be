"""``vmcloud deploy|list|show|snapshot|delete|host|console``: requests to the dispatcher.

Each command is one request: every call it makes (``deploy --wait`` polls too)
carries the same request id, which the services' log lines show.

Each first reaches the dispatcher within ``[DEFAULT] cli_timeout`` seconds, the
bus and then a ping, and fails naming what did not answer: an RPC call to a
dispatcher that is down would wait out the whole ``rpc_call_timeout`` (which a
deploy may need) before saying anything.
"""
import argparse
import functools
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
SNAPSHOT_COLUMNS = ('id', 'deployment_id', 'state', 'created_at', 'reason')
ITEM_COLUMNS = ('instance_id', 'state', 'version', 'pause_ms', 'dirty_bytes', 'uploaded_bytes',
                'reason')
HOST_COLUMNS = ('name', 'state', 'vcpus', 'vcpus_used', 'memory_mib', 'memory_mib_used',
                'instances', 'last_heartbeat')
SNAPSHOT_ACTIONS = ('create', 'list', 'show')
# A snapshot that is still on its way or complete; partial and error are not success.
SNAPSHOT_OK = (states.FREEZING, states.UPLOADING, states.AVAILABLE)


def _api(conf: cfg.ConfigOpts) -> rpcapi.DispatcherAPI:
    """The dispatcher's API, once a dispatcher answered a ping.

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable naming the bus;
        DispatcherUnavailable naming the bus and the topic if no dispatcher answers
        within ``cli_timeout`` s.
    """
    api = _connect(conf)
    try:
        api.ping(timeout=conf.cli_timeout)
    except (exception.MessageBusUnreachable, exception.MessageBusRefused):
        raise
    except exception.MessagingError as exc:
        # Imported by rpc already, which silences the warnings its import prints.
        import oslo_messaging
        if not isinstance(exc.__cause__, oslo_messaging.MessagingTimeout):
            raise
        raise exception.DispatcherUnavailable(_bus(conf), rpcapi.TOPIC,
                                              conf.cli_timeout) from exc
    return api


def _bus(conf: cfg.ConfigOpts) -> str:
    """The bus as errors name it, its passwords masked."""
    url = conf.transport_url or 'rabbit://'
    if url.rstrip('/') == 'rabbit:':
        # The driver's default: say where that is, 'rabbit://' alone does not.
        return f'{url} (guest@localhost:5672)'
    return rpc.masked_url(url)


def _connect(conf: cfg.ConfigOpts) -> rpcapi.DispatcherAPI:
    """The client, its bus reached within ``cli_timeout`` s.

    Connecting is bounded in attempts (rpc_connect_retries), not in time: a bus whose
    host drops packets or never answers costs kombu's connect timeout per attempt, and
    a host name lookup has no timeout at all. The attempts run in a thread left behind
    when the time is up; the command exits right after.

    :raises: ConfigError, MessageBusRefused, MessageBusUnreachable.
    """
    outcome: dict = {}

    def connect() -> None:
        try:
            outcome['api'] = rpcapi.DispatcherAPI(conf)
        except BaseException as exc:  # re-raised in the command's thread
            outcome['error'] = exc
    worker = threading.Thread(target=rpc.with_current_request(connect), daemon=True,
                              name='vmcloud-connect')
    worker.start()
    worker.join(conf.cli_timeout)
    if worker.is_alive():
        raise exception.MessageBusUnreachable(
            f'cannot reach the message bus at {_bus(conf)} within {conf.cli_timeout} s '
            '([DEFAULT] cli_timeout)')
    if 'error' in outcome:
        raise outcome['error']
    return outcome['api']


def _one_request(handler):
    @functools.wraps(handler)
    def run(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        with rpc.request_context():
            return handler(conf, args)
    return run


def _boot(args: argparse.Namespace) -> dict:
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


def _health(args: argparse.Namespace) -> dict:
    health = dict(args.health or readiness.DEFAULT)
    if args.health_timeout is not None:
        health['timeout'] = args.health_timeout
    return health


def _waiting(what: str, ident: str, timeout: float, look: str) -> None:
    """Say what is waited for, and how to look at it, before waiting: if the wait
    fails, the id is on the terminal already."""
    print(f'vmcloud: {what} {ident}: waiting up to {timeout:g} s (`{look}` shows it)',
          file=sys.stderr, flush=True)


def _timed_out(error: exception.WaitTimedOut, look: str) -> exception.WaitTimedOut:
    return exception.WaitTimedOut(f'{error}; it goes on: `{look}` shows it')


def _wait_deployment(api: rpcapi.DispatcherAPI, deployment: dict, args) -> dict:
    """:raises: WaitTimedOut naming the deployment and the command that shows it."""
    ident = deployment['id']
    look = f'vmcloud show {ident}'
    _waiting('deployment', ident, args.timeout, look)
    bar = output.ProgressBar(f'deploying {ident[:8]}', unit='instances',
                             enabled=args.progress)

    def progress(current: dict) -> None:
        bar(sum(1 for i in current['instances'] if i['state'] != states.BUILDING),
            len(current['instances']))
    try:
        return api.wait_deployment(ident, args.timeout, progress)
    except exception.WaitTimedOut as exc:
        raise _timed_out(exc, look) from exc
    finally:
        bar.close()


def _show_nested(record: dict, rows: str, columns: tuple, fmt: str) -> None:
    """``record`` with its list ``rows`` as a table below it (json: all as one)."""
    if fmt == 'json':
        output.emit_record(record, fmt)
        return
    output.emit_record({k: v for k, v in record.items() if k != rows}, fmt)
    output.emit(record[rows], columns, fmt)


def _show(deployment: dict, fmt: str) -> None:
    _show_nested(deployment, 'instances', INSTANCE_COLUMNS, fmt)


def _show_snapshot(snapshot: dict, fmt: str) -> None:
    _show_nested(snapshot, 'items', ITEM_COLUMNS, fmt)


@_one_request
def do_deploy(conf, args) -> int:
    api = _api(conf)
    if args.from_snapshot:
        deployment = api.deploy_snapshot(args.from_snapshot, _boot(args),
                                         allow_partial=args.partial)
    else:
        deployment = api.deploy(args.image, args.count, args.min_count, args.vcpus,
                                args.memory, _boot(args), health=_health(args))
    if args.wait:
        deployment = _wait_deployment(api, deployment, args)
    _show(deployment, args.fmt)
    return 0 if deployment['state'] in states.RUNNING_STATES else 1


@_one_request
def do_list(conf, args) -> int:
    output.emit(_api(conf).list_deployments(),
                ('id', 'image', 'count', 'state', 'created_at', 'reason'), args.fmt)
    return 0


@_one_request
def do_show(conf, args) -> int:
    _show(_api(conf).show_deployment(args.deployment), args.fmt)
    return 0


@_one_request
def do_snapshot_create(conf, args) -> int:
    """:raises: WaitTimedOut naming the snapshot and the command that shows it."""
    api = _api(conf)
    snapshot = api.snapshot(args.deployment)
    if args.wait:
        look = f'vmcloud snapshot show {snapshot["id"]}'
        _waiting('snapshot', snapshot['id'], args.timeout, look)
        try:
            snapshot = api.wait_snapshot(snapshot['id'], args.timeout)
        except exception.WaitTimedOut as exc:
            raise _timed_out(exc, look) from exc
    _show_snapshot(snapshot, args.fmt)
    return 0 if snapshot['state'] in SNAPSHOT_OK else 1


@_one_request
def do_snapshot_list(conf, args) -> int:
    output.emit(_api(conf).list_snapshots(args.deployment), SNAPSHOT_COLUMNS, args.fmt)
    return 0


@_one_request
def do_snapshot_show(conf, args) -> int:
    _show_snapshot(_api(conf).show_snapshot(args.snapshot), args.fmt)
    return 0


@_one_request
def do_delete(conf, args) -> int:
    _show(_api(conf).delete_deployment(args.deployment), args.fmt)
    return 0


@_one_request
def do_host_list(conf, args) -> int:
    output.emit(_api(conf).list_hosts(), HOST_COLUMNS, args.fmt)
    return 0


FENCE_EFFECT = ('fencing {host} declares it dead: its instances are rebuilt on other '
                'hosts (or end in error where none can take them), it takes no new ones, and '
                'a guest still running on it is destroyed when it reports again')


@_one_request
def do_host_fence(conf, args) -> int:
    """:raises: InvalidRequest without ``--yes`` (nothing asked of the dispatcher)."""
    if not args.yes:
        raise exception.InvalidRequest(
            FENCE_EFFECT.format(host=args.host) + '; make sure it is down, then add --yes')
    result = _api(conf).fence_host(args.host)
    output.emit_record(result, args.fmt)
    return 0


@_one_request
def do_console(conf, args) -> int:
    result = _api(conf).console(args.instance, args.bytes)
    if args.fmt == 'json':
        output.emit_record(result, args.fmt)
        return 0
    text = result['console']
    sys.stdout.write(text if not text or text.endswith('\n') else text + '\n')
    return 0


def add_parsers(groups: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('-f', dest='fmt', choices=('table', 'json'), default='table')
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument('--wait', action='store_true',
                         help='wait until it is done (its id is printed on stderr first)')
    waiting.add_argument('--timeout', type=float, default=600, help='seconds --wait waits')
    waiting.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None)

    sub = groups.add_parser('deploy', parents=[common, waiting],
                            help='deploy N instances of an image, or redeploy a snapshot')
    sub.set_defaults(handler=do_deploy)
    sub.add_argument('image', nargs='?', metavar='IMAGE[:VERSION]')
    sub.add_argument('-n', '--count', type=int, default=1)
    sub.add_argument('--min-count', type=int, help='deploy if at least this many fit')
    sub.add_argument('--vcpus', type=int, default=1)
    sub.add_argument('--memory', type=int, default=256, help='MiB per instance')
    sub.add_argument('--kernel', metavar='IMAGE[:VERSION]|/PATH',
                     help='boot this kernel directly: a warehouse image (pinned to its '
                          'current version at deploy; each compute node fetches it once), '
                          'or an absolute path of a file that exists on every compute node')
    sub.add_argument('--initrd', metavar='IMAGE[:VERSION]|/PATH',
                     help='initrd for --kernel, named the same two ways')
    sub.add_argument('--cmdline', help="kernel command line; '{name}' is the instance name")
    sub.add_argument('--health', type=health_check, metavar='CHECK',
                     help='when an instance is ready (built): tcp:PORT (a connection to it '
                          'opens), http:PORT[/PATH] (a GET answers below 500), '
                          'console:REGEX (a console line matches), or marker (the image '
                          'prints VMCLOUD-PHASE boot-done; the default)')
    sub.add_argument('--health-timeout', type=float, metavar='SECONDS',
                     help='seconds an instance gets to pass it (default: [compute] '
                          'boot_timeout of its host)')
    sub.add_argument('--from-snapshot', metavar='SNAPSHOT',
                     help='one instance per instance of this snapshot, from its version')
    sub.add_argument('--partial', '--allow-partial', dest='partial', action='store_true',
                     help='with --from-snapshot: deploy a partial snapshot, only the '
                          'instances it stored')

    groups.add_parser('list', parents=[common], help='list deployments').set_defaults(
        handler=do_list)
    sub = groups.add_parser('show', parents=[common], help='show a deployment')
    sub.set_defaults(handler=do_show)
    sub.add_argument('deployment')

    snapshot = groups.add_parser(
        'snapshot', help='snapshot a deployment at one cut; list, show',
        description='`vmcloud snapshot DEPLOYMENT` is `vmcloud snapshot create DEPLOYMENT`.')
    actions = snapshot.add_subparsers(dest='action', required=True, metavar='ACTION')
    sub = actions.add_parser('create', parents=[common, waiting],
                             help='snapshot every instance of a deployment at one cut')
    sub.set_defaults(handler=do_snapshot_create)
    sub.add_argument('deployment')
    sub = actions.add_parser('list', parents=[common], help='list snapshots, newest first')
    sub.set_defaults(handler=do_snapshot_list)
    sub.add_argument('--deployment', metavar='DEPLOYMENT', help='only those of this one')
    sub = actions.add_parser('show', parents=[common],
                             help="show a snapshot and each instance's item")
    sub.set_defaults(handler=do_snapshot_show)
    sub.add_argument('snapshot', metavar='SNAPSHOT')

    sub = groups.add_parser('delete', parents=[common], help='delete a deployment')
    sub.set_defaults(handler=do_delete)
    sub.add_argument('deployment')

    host = groups.add_parser('host', help='list compute hosts, or fence a dead one')
    actions = host.add_subparsers(dest='action', required=True, metavar='ACTION')
    actions.add_parser('list', parents=[common],
                       help='list compute hosts: state up, unknown (silent) or fenced'
                       ).set_defaults(handler=do_host_list)
    sub = actions.add_parser('fence', parents=[common], help='declare a compute host dead',
                             description=FENCE_EFFECT.format(host='HOST') + '.')
    sub.set_defaults(handler=do_host_fence)
    sub.add_argument('host', metavar='HOST')
    sub.add_argument('--yes', action='store_true', help='yes, it is down: fence it')
    groups.add_parser('hosts', parents=[common], help='list compute hosts (as host list)'
                      ).set_defaults(handler=do_host_list)

    sub = groups.add_parser('console', parents=[common],
                            help="print an instance's console log, read on its host")
    sub.set_defaults(handler=do_console)
    sub.add_argument('instance', metavar='INSTANCE', help='its name or id')
    sub.add_argument('--bytes', type=int, default=65536, metavar='N',
                     help='at most the last N bytes (default 65536)')


def expand(command: str, words: list[str]) -> list[str]:
    """The words after ``command`` as its parser reads them: ``snapshot DEPLOYMENT ...``,
    as it was before snapshots had actions, is ``snapshot create DEPLOYMENT ...``."""
    if command == 'snapshot' and words and words[0] not in SNAPSHOT_ACTIONS + ('-h', '--help'):
        return ['create', *words]
    return words


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if getattr(args, 'handler', None) is do_deploy:
        if not (args.image or args.from_snapshot):
            parser.error('deploy needs an IMAGE or --from-snapshot')
        if args.partial and not args.from_snapshot:
            parser.error('--partial goes with --from-snapshot')
        if args.from_snapshot and (args.health or args.health_timeout is not None):
            parser.error('--health and --health-timeout go with IMAGE, not --from-snapshot')
        if args.health_timeout is not None and not args.health_timeout > 0:
            parser.error('--health-timeout must be above 0')
    if getattr(args, 'handler', None) is do_console and args.bytes < 1:
        parser.error('--bytes must be at least 1')
