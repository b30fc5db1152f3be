"""``vmcloud deployment list|show|create|delete|snapshot``: deployments as one group.

The same requests and output as ``vmcloud list|show|deploy|delete|snapshot`` and
``vmcloud app deploy`` (their handlers do the work: ``show``, ``delete`` and
``snapshot`` are theirs), to the dispatcher or, given its URL, to the REST API. A
deployment is created from an image, an application (into a cloud) or a snapshot.
"""
import argparse

from vmcloud.cmd import cloud
from vmcloud.cmd import clouds
from vmcloud.cmd import common
from vmcloud.cmd import output

HELP = 'manage deployments: list, show, create (deploy), delete, snapshot'
# What an application says of its deployments itself: not options of deploying it.
IMAGE_ONLY_OPTIONS = (('vcpus', '--vcpus'), ('memory', '--memory'), ('kernel', '--kernel'),
                      ('initrd', '--initrd'), ('cmdline', '--cmdline'), ('health', '--health'),
                      ('health_timeout', '--health-timeout'), ('port', '--port'),
                      ('protocol', '--protocol'))
DEFAULT_SIZE = {'vcpus': 1, 'memory': 256}


@common.one_request
def do_list(conf, args) -> int:
    # Only the filters given: a dispatcher of before takes a call without them.
    filters = {k: v for k, v in (('cloud', args.cloud), ('owner', args.owner)) if v}
    output.emit(cloud._client(conf, args).list_deployments(**filters),
                cloud.DEPLOYMENT_COLUMNS, args.fmt)
    return 0


@common.one_request
def do_create(conf, args) -> int:
    """Deploy an application into a cloud, an image, or a snapshot; exits 1 unless the
    deployment runs. :raises: as ``app deploy`` and ``deploy`` do."""
    api = cloud._client(conf, args)
    if args.application:
        return clouds.deploy_application(api, args.application, args.cloud or 'default',
                                         args)
    return cloud.deploy(api, args)


def add_parsers(groups: argparse._SubParsersAction) -> None:
    formatted = common.format_parent()
    waiting = common.waiting_parent()
    group = groups.add_parser('deployment', help=HELP)
    actions = group.add_subparsers(dest='action', required=True, metavar='ACTION')

    sub = actions.add_parser('list', parents=[formatted],
                             help='list deployments, newest first')
    sub.set_defaults(handler=do_list)
    sub.add_argument('--cloud', metavar='CLOUD', help='only those in this cloud')
    sub.add_argument('--owner', metavar='USER', help='only those this API user deployed')

    sub = actions.add_parser('show', parents=[formatted],
                             help='show a deployment and its instances')
    sub.set_defaults(handler=cloud.do_show)
    sub.add_argument('deployment', metavar='DEPLOYMENT')

    _add_create_parser(actions, formatted, waiting)

    sub = actions.add_parser('delete', parents=[formatted], help='delete a deployment')
    sub.set_defaults(handler=cloud.do_delete)
    sub.add_argument('deployment', metavar='DEPLOYMENT')

    sub = actions.add_parser('snapshot', parents=[formatted, waiting],
                             help='snapshot every instance of a deployment at one cut')
    sub.set_defaults(handler=cloud.do_snapshot_create)
    sub.add_argument('deployment', metavar='DEPLOYMENT')


def _add_create_parser(actions: argparse._SubParsersAction,
                       formatted: argparse.ArgumentParser,
                       waiting: argparse.ArgumentParser) -> None:
    sub = actions.add_parser(
        'create', parents=[formatted, waiting],
        help='deploy N instances of an image, of an application in a cloud, or redeploy '
             'a snapshot',
        description='Exactly one of IMAGE (or --image), --application, --snapshot.')
    sub.set_defaults(handler=do_create)
    sub.add_argument('image', nargs='?', metavar='IMAGE[:VERSION]')
    sub.add_argument('--image', dest='image_option', metavar='IMAGE[:VERSION]',
                     help='the image to deploy (as IMAGE)')
    sub.add_argument('--application', metavar='APP',
                     help='deploy this application (its image, size, boot, health check '
                          'and service) behind a listener port of the gateway')
    sub.add_argument('--snapshot', dest='from_snapshot', metavar='SNAPSHOT',
                     help='one instance per instance of this snapshot, from its version')
    sub.add_argument('-n', '--count', type=int, default=1)
    sub.add_argument('--min-count', type=int, help='deploy if at least this many fit')
    common.add_size_arguments(sub)
    # Unset unless given, to tell an application's deploy they do not go with it.
    sub.set_defaults(vcpus=None, memory=None)
    common.add_boot_arguments(sub)
    common.add_health_arguments(sub)
    sub.add_argument('--cloud', metavar='CLOUD',
                     help='deploy in this cloud: on its hosts, within its connection limit '
                          '(default: the cloud named default)')
    sub.add_argument('--port', type=common.port_number, metavar='PORT',
                     help='with --protocol and IMAGE: the port the guests serve on, which '
                          'the gateway exposes on a listener port of its own')
    sub.add_argument('--protocol', choices=common.PROTOCOLS,
                     help='with --port: what the gateway relays, HTTP requests or TCP')
    sub.add_argument('--partial', '--allow-partial', dest='partial', action='store_true',
                     help='with --snapshot: deploy a partial snapshot, only the instances '
                          'it stored')


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if getattr(args, 'handler', None) is not do_create:
        return
    if args.image and args.image_option:
        parser.error('name the image once: IMAGE or --image')
    args.image = args.image or args.image_option
    sources = [given for given in (args.image, args.application, args.from_snapshot) if given]
    if len(sources) != 1:
        parser.error('deployment create needs exactly one of IMAGE (or --image), '
                     '--application, --snapshot')
    if args.count < 1:
        parser.error('--count must be at least 1')
    if args.min_count is not None and not 1 <= args.min_count <= args.count:
        parser.error('--min-count must be between 1 and --count')
    if args.application:
        given = [option for name, option in IMAGE_ONLY_OPTIONS
                 if getattr(args, name) is not None]
        if given or args.partial:
            parser.error(f'{", ".join(given or ["--partial"])}: the application says '
                         'them; they go with IMAGE, not --application')
        return
    for name, default in DEFAULT_SIZE.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    cloud.check_deploy(args, parser, snapshot_option='--snapshot')
