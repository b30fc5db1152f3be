"""The ``vmcloud`` command.

Subcommand modules are imported only when their command runs: the services'
modules pull in oslo.messaging, SQLAlchemy and alembic (about a second), which
``vmcloud --help`` or ``vmcloud image list`` have no use for.
"""
import argparse
import importlib
import sys

from oslo_config import cfg

from vmcloud import exception

# command -> (module that adds its parser and handles it, one-line help)
COMMANDS = {
    'image': ('vmcloud.cmd.image', 'manage images in the warehouse'),
    'mirror': ('vmcloud.cmd.mirror', "serve instances' disks over NBD"),
    'mirror-service': ('vmcloud.cmd.mirror', "run this node's mirror service: the guests' "
                                             'disks, outliving the compute manager'),
    'warehouse': ('vmcloud.cmd.warehouse', 'serve the warehouse over HTTP'),
    'deploy': ('vmcloud.cmd.cloud', 'deploy N instances of an image, or redeploy a snapshot'),
    'list': ('vmcloud.cmd.cloud', 'list deployments'),
    'show': ('vmcloud.cmd.cloud', 'show a deployment'),
    'snapshot': ('vmcloud.cmd.cloud', 'snapshot a deployment at one cut; list, show'),
    'delete': ('vmcloud.cmd.cloud', 'delete a deployment'),
    'host': ('vmcloud.cmd.cloud', 'list compute hosts, or fence a dead one'),
    'hosts': ('vmcloud.cmd.cloud', 'list compute hosts (as host list)'),
    'console': ('vmcloud.cmd.cloud', "print an instance's console log, read on its host"),
    'cloud': ('vmcloud.cmd.clouds', 'manage clouds: a connection limit over a set of compute '
                                    'hosts'),
    'app': ('vmcloud.cmd.clouds', 'manage applications; deploy one into a cloud'),
    'deployment': ('vmcloud.cmd.deployments', 'manage deployments: list, show, create '
                                              '(deploy), delete, snapshot'),
    'dispatcher': ('vmcloud.cmd.service', 'run the dispatcher service'),
    'compute': ('vmcloud.cmd.service', 'run a compute manager service on this node'),
    'gateway': ('vmcloud.cmd.gateway', 'run the gateway service; its connections and stats'),
    'api': ('vmcloud.cmd.api', 'run the REST API service (and its dashboard)'),
    'user': ('vmcloud.cmd.users', "manage the REST API's users"),
    'demo': ('vmcloud.cmd.demo', 'all-in-one: deploy, snapshot and redeploy N guests'),
    'simulate': ('vmcloud.cmd.simulate', 'simulate VM consolidation on a day of PlanetLab traces'),
}

_OPTIONS_WITH_VALUES = ('--config-file', '--config-dir', '--api-url', '--password-file')


def chosen_command(argv: list[str]) -> str | None:
    """The command named in ``argv``: the first word that is not an option or its value.

    An option may be abbreviated, as argparse allows (``--config-f PATH``).
    """
    at = command_index(argv)
    return None if at is None else argv[at]


def command_index(argv: list[str]) -> int | None:
    """Where in ``argv`` the command is named (see ``chosen_command``)."""
    words = enumerate(argv)
    for at, word in words:
        if len(word) > 2 and any(o.startswith(word) for o in _OPTIONS_WITH_VALUES):
            next(words, None)
        elif not word.startswith('-'):
            return at
    return None


def expanded(argv: list[str], module) -> list[str]:
    """``argv`` with the words after the command as its module's ``expand`` rewrites them
    (a command's older form), if it has one."""
    at = command_index(argv)
    expand = getattr(module, 'expand', None)
    if at is None or expand is None:
        return argv
    return argv[:at + 1] + expand(argv[at], argv[at + 1:])


def build_parser(argv: list[str] | None = None):
    """The parser, with the full parser of the chosen command's module and one line for the others.

    :returns: (parser, the chosen command's module or None).
    """
    parser = argparse.ArgumentParser(
        prog='vmcloud', description='Deploy and snapshot many virtual machines at once.')
    parser.add_argument('--config-file', action='append', default=[], metavar='PATH',
                        help='configuration file (may be repeated)')
    parser.add_argument('--config-dir', metavar='DIR',
                        help='directory of *.conf files read after --config-file')
    parser.add_argument('--api-url', metavar='URL',
                        help='ask the REST API at URL (`vmcloud api`), not the dispatcher '
                             'over the bus (default: $VMCLOUD_API_URL), with $VMCLOUD_TOKEN, '
                             'or $VMCLOUD_USERNAME and $VMCLOUD_PASSWORD or --password-file')
    parser.add_argument('--password-file', dest='api_password_file', metavar='FILE',
                        help="with --api-url: the password of $VMCLOUD_USERNAME, the file's "
                             'first line')
    groups = parser.add_subparsers(dest='group', required=True, metavar='COMMAND')
    command = chosen_command(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(COMMANDS[command][0]) if command in COMMANDS else None
    module_added = False
    for name, (module_name, help_text) in COMMANDS.items():
        if module is None or module_name != module.__name__:
            groups.add_parser(name, help=help_text)
        elif not module_added:
            # At its first command's place, so --help lists commands in the table's order.
            _add_parsers(module, groups)
            module_added = True
    return parser, module


def _add_parsers(module, groups: argparse._SubParsersAction) -> None:
    add = getattr(module, 'add_parsers', None) or module.add_parser
    add(groups)


def load_config(args: argparse.Namespace) -> cfg.ConfigOpts:
    """The configuration, every option registered so far checked.

    oslo.config converts a value only when it is first read, so a bad value in
    the file would surface as a traceback wherever that happens: read them all now.

    :raises: ConfigError naming the file's problem or the option with a bad value.
    """
    import vmcloud.conf

    conf_args = []
    for path in args.config_file:
        conf_args += ['--config-file', path]
    if args.config_dir:
        conf_args += ['--config-dir', args.config_dir]
    conf = vmcloud.conf.CONF
    try:
        conf(conf_args, project='vmcloud', default_config_files=None if conf_args else [])
    except cfg.Error as exc:
        raise exception.ConfigError(f'bad configuration: {exc}') from exc
    check_values(conf)
    return conf


def check_values(conf: cfg.ConfigOpts) -> None:
    """:raises: ConfigError naming the first option whose configured value does not convert."""
    for key in conf:
        try:
            value = conf[key]
        except cfg.ConfigFileValueError as exc:
            raise _bad_value(key, exc) from exc
        if isinstance(value, cfg.ConfigOpts.GroupAttr):
            for name in value:
                try:
                    value[name]
                except cfg.ConfigFileValueError as exc:
                    raise _bad_value(f'[{key}] {name}', exc) from exc


def _bad_value(where: str, exc: cfg.ConfigFileValueError) -> exception.ConfigError:
    # oslo.config's text repeats the location's repr; the conversion's own error says enough.
    reason = exc.__cause__ or exc.__context__ or exc
    return exception.ConfigError(f'bad configuration: {where}: {reason}')


def _registered_later(conf: cfg.ConfigOpts | None, exc: cfg.Error) -> str:
    """What to say of a configuration error raised after load_config."""
    if conf is not None:
        try:
            check_values(conf)
        except exception.ConfigError as named:
            return str(named)
        except cfg.Error:
            pass
    return f'bad configuration: {exc}'


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv)
    args = parser.parse_args(expanded(argv, module))
    if hasattr(module, 'check'):
        module.check(args, parser)
    if getattr(args, 'log', False):
        from vmcloud.cmd import service
        service.setup_logging()
    conf = None
    try:
        conf = load_config(args)
        return args.handler(conf, args) or 0
    except cfg.Error as exc:
        # An option group registered after load_config (a driver's own) read with a bad
        # value: registered now, it is checked as the others were, to name the option.
        print(f'vmcloud: error: {_registered_later(conf, exc)}', file=sys.stderr)
        return 1
    except (exception.VmcloudError, OSError) as exc:
        # OSError's text names the path and the reason (a read-only state_path, a full disk).
        print(f'vmcloud: error: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('vmcloud: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
