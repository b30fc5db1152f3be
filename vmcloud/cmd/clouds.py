"""``vmcloud cloud ...`` and ``vmcloud app ...``: clouds, applications, and deploying an
application into a cloud, as requests to the dispatcher.

A cloud is a connection limit over a set of compute hosts (none listed: every host);
an application is an image serving one port, which the gateway exposes on a listener
port of each deployment of it. Each command is one request (see ``common``), to the
dispatcher or, given its URL, to the REST API (``common.client``).
"""
import argparse

from vmcloud.cmd import common
from vmcloud.cmd import output

CLOUD_COLUMNS = ('name', 'connection_limit', 'hosts')
APPLICATION_COLUMNS = ('name', 'image', 'protocol', 'port', 'vcpus', 'memory_mib',
                       'connection_limit')
CLOUD_ACTIONS_HELP = 'manage clouds: a connection limit over a set of compute hosts'
APP_ACTIONS_HELP = 'manage applications; deploy one into a cloud'
# How a table says what JSON says with an empty list or null.
EVERY_HOST = '(every host)'
NO_LIMIT = '(none)'

# Looked up at each call, as a module name: a test may give the commands a fake API.
_api = common.dispatcher_api


def _client(conf, args):
    """The REST API's client if the command was given one, else ``_api(conf)``."""
    return common.client(conf, args, _api)


def _cloud_cells(cloud: dict) -> dict:
    """``cloud`` as a table shows it: its hosts on one line."""
    hosts = cloud.get('hosts')
    if hosts is None:
        return cloud
    return {**cloud, 'hosts': ', '.join(hosts) or EVERY_HOST}


def _application_cells(application: dict) -> dict:
    """``application`` as a table shows it: no limit said as such, not as None."""
    if 'connection_limit' in application and application['connection_limit'] is None:
        return {**application, 'connection_limit': NO_LIMIT}
    return application


def _show_record(record: dict, cells, fmt: str) -> None:
    output.emit_record(record if fmt == 'json' else cells(record), fmt)


def _list(records: list[dict], columns: tuple, cells, fmt: str) -> None:
    output.emit(records if fmt == 'json' else [cells(r) for r in records], columns, fmt)


# -- clouds ------------------------------------------------------------------------

@common.one_request
def do_cloud_create(conf, args) -> int:
    """:raises: InvalidRequest (a bad or taken name), HostNotFound."""
    cloud = _client(conf, args).create_cloud(args.name, args.connection_limit, hosts=args.hosts)
    _show_record(cloud, _cloud_cells, args.fmt)
    return 0


@common.one_request
def do_cloud_list(conf, args) -> int:
    _list(_client(conf, args).list_clouds(), CLOUD_COLUMNS, _cloud_cells, args.fmt)
    return 0


@common.one_request
def do_cloud_show(conf, args) -> int:
    """:raises: CloudNotFound."""
    _show_record(_client(conf, args).show_cloud(args.name), _cloud_cells, args.fmt)
    return 0


@common.one_request
def do_cloud_update(conf, args) -> int:
    """:raises: CloudNotFound, HostNotFound, InvalidRequest."""
    cloud = _client(conf, args).update_cloud(
        args.name, connection_limit=args.connection_limit, add_hosts=args.add_hosts,
        remove_hosts=args.remove_hosts)
    _show_record(cloud, _cloud_cells, args.fmt)
    return 0


@common.one_request
def do_cloud_delete(conf, args) -> int:
    """:raises: CloudNotFound; InvalidRequest for ``default`` or a cloud with a live
    deployment."""
    deleted = _client(conf, args).delete_cloud(args.name)
    # What the cloud was, if the dispatcher says; its name at least.
    _show_record(deleted or {'name': args.name}, _cloud_cells, args.fmt)
    return 0


# -- applications --------------------------------------------------------------------

@common.one_request
def do_app_create(conf, args) -> int:
    """:raises: InvalidRequest (a bad or taken name, a bad health check), ImageNotFound."""
    application = _client(conf, args).create_application(
        args.name, args.image, args.port, args.protocol, args.vcpus, args.memory,
        boot=common.boot(args), health=common.health(args),
        connection_limit=args.connection_limit)
    _show_record(application, _application_cells, args.fmt)
    return 0


@common.one_request
def do_app_list(conf, args) -> int:
    _list(_client(conf, args).list_applications(), APPLICATION_COLUMNS, _application_cells,
          args.fmt)
    return 0


@common.one_request
def do_app_show(conf, args) -> int:
    """:raises: ApplicationNotFound."""
    _show_record(_client(conf, args).show_application(args.name), _application_cells, args.fmt)
    return 0


@common.one_request
def do_app_delete(conf, args) -> int:
    """:raises: ApplicationNotFound; InvalidRequest while it is deployed."""
    deleted = _client(conf, args).delete_application(args.name)
    _show_record(deleted or {'name': args.name}, _application_cells, args.fmt)
    return 0


@common.one_request
def do_app_deploy(conf, args) -> int:
    """Deploy ``count`` instances of the application in the cloud; with ``--wait``, wait
    as ``vmcloud deploy --wait`` does. Exits 1 unless the deployment runs.

    :raises: ApplicationNotFound, CloudNotFound, NoValidHost, ListenerPortsExhausted,
        WaitTimedOut naming the deployment and the command that shows it.
    """
    return deploy_application(_client(conf, args), args.name, args.cloud, args)


def deploy_application(api, application: str, cloud: str, args: argparse.Namespace) -> int:
    """``app deploy``'s work, and ``deployment create --application``'s, with ``api``
    (either client): deploy, maybe wait, show; the exit status."""
    deployment = api.deploy_application(application, cloud, args.count,
                                        min_count=args.min_count)
    if args.wait:
        deployment = common.wait_deployment(api, deployment, args)
    common.show_deployment(deployment, args.fmt)
    return common.deployed(deployment)


# -- parsers -------------------------------------------------------------------------

def add_parsers(groups: argparse._SubParsersAction) -> None:
    formatted = common.format_parent()
    _add_cloud_parsers(groups, formatted)
    _add_app_parsers(groups, formatted, common.waiting_parent())


def _add_cloud_parsers(groups: argparse._SubParsersAction,
                       formatted: argparse.ArgumentParser) -> None:
    cloud = groups.add_parser('cloud', help=CLOUD_ACTIONS_HELP)
    actions = cloud.add_subparsers(dest='action', required=True, metavar='ACTION')

    sub = actions.add_parser('create', parents=[formatted], help='create a cloud')
    sub.set_defaults(handler=do_cloud_create)
    sub.add_argument('name', metavar='NAME', help='[a-z0-9-], at most 32 characters')
    sub.add_argument('--connection-limit', type=common.connection_limit, required=True,
                     metavar='N', help='connections its deployments serve at once, '
                                       'all together; the gateway refuses the next')
    sub.add_argument('--host', dest='hosts', action='append', default=[], metavar='HOST',
                     help='a compute host its instances run on (may be repeated; '
                          'none: every host)')

    actions.add_parser('list', parents=[formatted], help='list clouds').set_defaults(
        handler=do_cloud_list)

    sub = actions.add_parser('show', parents=[formatted], help='show a cloud')
    sub.set_defaults(handler=do_cloud_show)
    sub.add_argument('name', metavar='NAME')

    sub = actions.add_parser('update', parents=[formatted],
                             help="change a cloud's connection limit or hosts")
    sub.set_defaults(handler=do_cloud_update)
    sub.add_argument('name', metavar='NAME')
    sub.add_argument('--connection-limit', type=common.connection_limit, metavar='N')
    sub.add_argument('--add-host', dest='add_hosts', action='append', default=[],
                     metavar='HOST', help='may be repeated')
    sub.add_argument('--remove-host', dest='remove_hosts', action='append', default=[],
                     metavar='HOST', help='may be repeated (instances on it stay)')

    sub = actions.add_parser('delete', parents=[formatted],
                             help='delete a cloud that has no live deployment')
    sub.set_defaults(handler=do_cloud_delete)
    sub.add_argument('name', metavar='NAME')


def _add_app_parsers(groups: argparse._SubParsersAction, formatted: argparse.ArgumentParser,
                     waiting: argparse.ArgumentParser) -> None:
    app = groups.add_parser('app', help=APP_ACTIONS_HELP)
    actions = app.add_subparsers(dest='action', required=True, metavar='ACTION')

    sub = actions.add_parser('create', parents=[formatted],
                             help='create an application: an image serving one port')
    sub.set_defaults(handler=do_app_create)
    sub.add_argument('name', metavar='NAME')
    sub.add_argument('--image', required=True, metavar='IMAGE[:VERSION]')
    sub.add_argument('--port', type=common.port_number, required=True, metavar='PORT',
                     help='the port its guests serve on')
    sub.add_argument('--protocol', choices=common.PROTOCOLS, required=True,
                     help='what the gateway relays to it: HTTP requests or TCP')
    sub.add_argument('--connection-limit', type=common.connection_limit, metavar='N',
                     help='connections all its deployments together serve at once, in '
                          "every cloud (default: only each cloud's limit)")
    common.add_size_arguments(sub)
    common.add_boot_arguments(sub)
    common.add_health_arguments(sub)

    actions.add_parser('list', parents=[formatted], help='list applications'
                       ).set_defaults(handler=do_app_list)
    sub = actions.add_parser('show', parents=[formatted], help='show an application')
    sub.set_defaults(handler=do_app_show)
    sub.add_argument('name', metavar='NAME')
    sub = actions.add_parser('delete', parents=[formatted],
                             help='delete an application that is not deployed')
    sub.set_defaults(handler=do_app_delete)
    sub.add_argument('name', metavar='NAME')

    sub = actions.add_parser('deploy', parents=[formatted, waiting],
                             help='deploy N instances of an application in a cloud, '
                                  'behind a listener port of the gateway')
    sub.set_defaults(handler=do_app_deploy)
    sub.add_argument('name', metavar='NAME')
    sub.add_argument('--cloud', default='default', metavar='CLOUD',
                     help='the cloud to deploy it in (default: default)')
    sub.add_argument('-n', '--count', type=int, default=1)
    sub.add_argument('--min-count', type=int, help='deploy if at least this many fit')


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    handler = getattr(args, 'handler', None)
    if handler is do_app_create and (problem := common.health_timeout_problem(args)):
        parser.error(problem)
    if handler is do_cloud_update and not (args.connection_limit is not None
                                           or args.add_hosts or args.remove_hosts):
        parser.error('cloud update needs --connection-limit, --add-host or --remove-host')
    if handler is do_app_deploy:
        if args.count < 1:
            parser.error('--count must be at least 1')
        if args.min_count is not None and not 1 <= args.min_count <= args.count:
            parser.error('--min-count must be between 1 and --count')
