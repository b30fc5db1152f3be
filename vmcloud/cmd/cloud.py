"""``vmcloud deploy|list|show|snapshot|delete|host|console``: requests to the dispatcher.

Each command is one request: every call it makes (``deploy --wait`` polls too)
carries the same request id, which the services' log lines show. Each reaches the
dispatcher first, within ``[DEFAULT] cli_timeout`` (see ``common``); given the REST
API's URL, all but ``console`` ask the API instead (``common.client``).
"""
import argparse
import sys

from vmcloud import exception
from vmcloud.cmd import common
from vmcloud.cmd import output
from vmcloud.dispatcher import states

SNAPSHOT_COLUMNS = ('id', 'deployment_id', 'state', 'replicated', 'persistent', 'created_at',
                    'reason')
ITEM_COLUMNS = ('instance_id', 'state', 'replicated', 'persistent', 'version', 'pause_ms',
                'dirty_bytes', 'uploaded_bytes', 'reason')
HOST_COLUMNS = ('name', 'state', 'vcpus', 'vcpus_used', 'memory_mib', 'memory_mib_used',
                'instances', 'peer_url', 'last_heartbeat')
DEPLOYMENT_COLUMNS = ('id', 'image', 'count', 'state', 'created_at', 'reason')
SNAPSHOT_ACTIONS = ('create', 'list', 'show')
# A snapshot that is still on its way or complete; partial and error are not success.
SNAPSHOT_OK = (states.FREEZING, states.UPLOADING, states.AVAILABLE)

# Looked up at each call, as module names: a test gives the commands a fake API.
_api = common.dispatcher_api
_show = common.show_deployment
_one_request = common.one_request


def _client(conf, args):
    """The REST API's client if the command was given one, else ``_api(conf)``."""
    return common.client(conf, args, _api)


def _show_snapshot(snapshot: dict, fmt: str) -> None:
    common.show_nested(snapshot, 'items', ITEM_COLUMNS, fmt)


def _exposure(args: argparse.Namespace) -> dict:
    """``--cloud``, ``--port``, ``--protocol`` as deploy's keyword arguments, only those
    given: without them a deployment is in the default cloud and has no listener."""
    # getattr: a Namespace made by a caller other than this parser may lack them.
    given = {name: getattr(args, name, None) for name in ('cloud', 'port', 'protocol')}
    return {name: value for name, value in given.items() if value is not None}


@_one_request
def do_deploy(conf, args) -> int:
    return deploy(_client(conf, args), args)


def deploy(api, args: argparse.Namespace) -> int:
    """``deploy``'s work, and ``deployment create``'s of an image or a snapshot, with
    ``api`` (either client): deploy, maybe wait, show; the exit status."""
    if args.from_snapshot:
        deployment = api.deploy_snapshot(args.from_snapshot, common.boot(args),
                                         allow_partial=args.partial)
    else:
        deployment = api.deploy(args.image, args.count, args.min_count, args.vcpus,
                                args.memory, common.boot(args), health=common.health(args),
                                **_exposure(args))
    if args.wait:
        deployment = common.wait_deployment(api, deployment, args)
    _show(deployment, args.fmt)
    return common.deployed(deployment)


@_one_request
def do_list(conf, args) -> int:
    output.emit(_client(conf, args).list_deployments(), DEPLOYMENT_COLUMNS, args.fmt)
    return 0


@_one_request
def do_show(conf, args) -> int:
    _show(_client(conf, args).show_deployment(args.deployment), args.fmt)
    return 0


@_one_request
def do_snapshot_create(conf, args) -> int:
    """:raises: WaitTimedOut naming the snapshot and the command that shows it."""
    api = _client(conf, args)
    snapshot = api.snapshot(args.deployment)
    if args.wait:
        look = f'vmcloud snapshot show {snapshot["id"]}'
        common.say_waiting('snapshot', snapshot['id'], args.timeout, look)
        try:
            snapshot = api.wait_snapshot(snapshot['id'], args.timeout)
        except exception.WaitTimedOut as exc:
            raise common.timed_out(exc, look) from exc
    _show_snapshot(snapshot, args.fmt)
    return 0 if snapshot['state'] in SNAPSHOT_OK else 1


@_one_request
def do_snapshot_list(conf, args) -> int:
    output.emit(_client(conf, args).list_snapshots(args.deployment), SNAPSHOT_COLUMNS, args.fmt)
    return 0


@_one_request
def do_snapshot_show(conf, args) -> int:
    _show_snapshot(_client(conf, args).show_snapshot(args.snapshot), args.fmt)
    return 0


@_one_request
def do_delete(conf, args) -> int:
    _show(_client(conf, args).delete_deployment(args.deployment), args.fmt)
    return 0


@_one_request
def do_host_list(conf, args) -> int:
    output.emit(_client(conf, args).list_hosts(), HOST_COLUMNS, args.fmt)
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
    result = _client(conf, args).fence_host(args.host)
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
    formatted = common.format_parent()
    waiting = common.waiting_parent()

    sub = groups.add_parser('deploy', parents=[formatted, waiting],
                            help='deploy N instances of an image, or redeploy a snapshot')
    sub.set_defaults(handler=do_deploy)
    sub.add_argument('image', nargs='?', metavar='IMAGE[:VERSION]')
    sub.add_argument('-n', '--count', type=int, default=1)
    sub.add_argument('--min-count', type=int, help='deploy if at least this many fit')
    common.add_size_arguments(sub)
    common.add_boot_arguments(sub)
    common.add_health_arguments(sub)
    sub.add_argument('--cloud', metavar='CLOUD',
                     help='deploy in this cloud: on its hosts, within its connection limit '
                          '(default: the cloud named default)')
    sub.add_argument('--port', type=common.port_number, metavar='PORT',
                     help='with --protocol: the port the guests serve on, which the gateway '
                          'exposes on a listener port of its own (shown as listener_port)')
    sub.add_argument('--protocol', choices=common.PROTOCOLS,
                     help='with --port: what the gateway relays, HTTP requests or TCP')
    sub.add_argument('--from-snapshot', metavar='SNAPSHOT',
                     help='one instance per instance of this snapshot, from its version')
    sub.add_argument('--partial', '--allow-partial', dest='partial', action='store_true',
                     help='with --from-snapshot: deploy a partial snapshot, only the '
                          'instances it stored')

    groups.add_parser('list', parents=[formatted], help='list deployments').set_defaults(
        handler=do_list)
    sub = groups.add_parser('show', parents=[formatted], help='show a deployment')
    sub.set_defaults(handler=do_show)
    sub.add_argument('deployment')

    snapshot = groups.add_parser(
        'snapshot', help='snapshot a deployment at one cut; list, show',
        description='`vmcloud snapshot DEPLOYMENT` is `vmcloud snapshot create DEPLOYMENT`.')
    actions = snapshot.add_subparsers(dest='action', required=True, metavar='ACTION')
    sub = actions.add_parser('create', parents=[formatted, waiting],
                             help='snapshot every instance of a deployment at one cut')
    sub.set_defaults(handler=do_snapshot_create)
    sub.add_argument('deployment')
    sub = actions.add_parser('list', parents=[formatted], help='list snapshots, newest first')
    sub.set_defaults(handler=do_snapshot_list)
    sub.add_argument('--deployment', metavar='DEPLOYMENT', help='only those of this one')
    sub = actions.add_parser('show', parents=[formatted],
                             help="show a snapshot and each instance's item")
    sub.set_defaults(handler=do_snapshot_show)
    sub.add_argument('snapshot', metavar='SNAPSHOT')

    sub = groups.add_parser('delete', parents=[formatted], help='delete a deployment')
    sub.set_defaults(handler=do_delete)
    sub.add_argument('deployment')

    host = groups.add_parser('host', help='list compute hosts, or fence a dead one')
    actions = host.add_subparsers(dest='action', required=True, metavar='ACTION')
    actions.add_parser('list', parents=[formatted],
                       help='list compute hosts: state up, unknown (silent) or fenced'
                       ).set_defaults(handler=do_host_list)
    sub = actions.add_parser('fence', parents=[formatted], help='declare a compute host dead',
                             description=FENCE_EFFECT.format(host='HOST') + '.')
    sub.set_defaults(handler=do_host_fence)
    sub.add_argument('host', metavar='HOST')
    sub.add_argument('--yes', action='store_true', help='yes, it is down: fence it')
    groups.add_parser('hosts', parents=[formatted], help='list compute hosts (as host list)'
                      ).set_defaults(handler=do_host_list)

    sub = groups.add_parser('console', parents=[formatted],
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
        check_deploy(args, parser)
    if getattr(args, 'handler', None) is do_console and args.bytes < 1:
        parser.error('--bytes must be at least 1')


def check_deploy(args: argparse.Namespace, parser: argparse.ArgumentParser,
                 snapshot_option: str = '--from-snapshot') -> None:
    """What deploy's options refuse of each other (``snapshot_option``: the name of the
    option that names a snapshot)."""
    if args.partial and not args.from_snapshot:
        parser.error(f'--partial goes with {snapshot_option}')
    if args.from_snapshot and (args.health or args.health_timeout is not None):
        parser.error(f'--health and --health-timeout go with IMAGE, not {snapshot_option}')
    if problem := common.health_timeout_problem(args):
        parser.error(problem)
    if (args.port is None) != (args.protocol is None):
        parser.error('--port and --protocol go together: the port the guests serve on '
                     'and what the gateway relays to it (http or tcp)')
    if args.from_snapshot and (args.cloud or args.port is not None):
        # deploy_snapshot takes none of them: refused rather than silently ignored.
        parser.error(f'--cloud, --port and --protocol go with IMAGE, not {snapshot_option}')
