"""``vmcloud deploy|list|show|snapshot|delete|hosts``: requests to the dispatcher.

Each command is one request: every call it makes (``deploy --wait`` polls too)
carries the same request id, which the services' log lines show.
"""
import argparse
import functools

from oslo_config import cfg

from vmcloud import rpc
from vmcloud.cmd import output
from vmcloud.dispatcher import rpcapi
from vmcloud.dispatcher import states

INSTANCE_COLUMNS = ('name', 'host', 'state', 'image', 'boot_seconds', 'reason')


def _api(conf: cfg.ConfigOpts) -> rpcapi.DispatcherAPI:
    return rpcapi.DispatcherAPI(conf)


def _one_request(handler):
    @functools.wraps(handler)
    def run(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
        with rpc.request_context():
            return handler(conf, args)
    return run


def _boot(args: argparse.Namespace) -> dict:
    return {k: v for k, v in (('kernel', args.kernel), ('initrd', args.initrd),
                              ('cmdline', args.cmdline)) if v}


def _wait_deployment(api: rpcapi.DispatcherAPI, deployment: dict, args) -> dict:
    bar = output.ProgressBar(f'deploying {deployment["id"][:8]}', unit='instances',
                             enabled=args.progress)

    def progress(current: dict) -> None:
        bar(sum(1 for i in current['instances'] if i['state'] != states.BUILDING),
            len(current['instances']))
    try:
        return api.wait_deployment(deployment['id'], args.timeout, progress)
    finally:
        bar.close()


def _show(deployment: dict, fmt: str) -> None:
    if fmt == 'json':
        output.emit_record(deployment, fmt)
        return
    output.emit_record({k: v for k, v in deployment.items() if k != 'instances'}, fmt)
    output.emit(deployment['instances'], INSTANCE_COLUMNS, fmt)


@_one_request
def do_deploy(conf, args) -> int:
    api = _api(conf)
    if args.from_snapshot:
        deployment = api.deploy_snapshot(args.from_snapshot, _boot(args))
    else:
        deployment = api.deploy(args.image, args.count, args.min_count, args.vcpus,
                                args.memory, _boot(args))
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
def do_snapshot(conf, args) -> int:
    api = _api(conf)
    snapshot = api.snapshot(args.deployment)
    if args.wait:
        snapshot = api.wait_snapshot(snapshot['id'], args.timeout)
    if args.fmt == 'json':
        output.emit_record(snapshot, args.fmt)
    else:
        output.emit_record({k: v for k, v in snapshot.items() if k != 'items'}, args.fmt)
        output.emit(snapshot['items'], ('instance_id', 'state', 'version', 'pause_ms',
                                        'dirty_bytes', 'uploaded_bytes', 'reason'), args.fmt)
    return 0 if snapshot['state'] in (states.AVAILABLE, states.UPLOADING) else 1


@_one_request
def do_delete(conf, args) -> int:
    _show(_api(conf).delete_deployment(args.deployment), args.fmt)
    return 0


@_one_request
def do_hosts(conf, args) -> int:
    output.emit(_api(conf).list_hosts(), ('name', 'up', 'vcpus', 'vcpus_used', 'memory_mib',
                                          'memory_mib_used', 'instances', 'last_heartbeat'),
                args.fmt)
    return 0


def add_parsers(groups: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('-f', dest='fmt', choices=('table', 'json'), default='table')
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument('--wait', action='store_true', help='wait until it is done')
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
    sub.add_argument('--from-snapshot', metavar='SNAPSHOT',
                     help='one instance per instance of this snapshot, from its version')

    groups.add_parser('list', parents=[common], help='list deployments').set_defaults(
        handler=do_list)
    sub = groups.add_parser('show', parents=[common], help='show a deployment')
    sub.set_defaults(handler=do_show)
    sub.add_argument('deployment')
    sub = groups.add_parser('snapshot', parents=[common, waiting],
                            help='snapshot every instance of a deployment at once')
    sub.set_defaults(handler=do_snapshot)
    sub.add_argument('deployment')
    sub = groups.add_parser('delete', parents=[common], help='delete a deployment')
    sub.set_defaults(handler=do_delete)
    sub.add_argument('deployment')
    groups.add_parser('hosts', parents=[common], help='list compute hosts').set_defaults(
        handler=do_hosts)


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if getattr(args, 'handler', None) is do_deploy and not (args.image or args.from_snapshot):
        parser.error('deploy needs an IMAGE or --from-snapshot')
