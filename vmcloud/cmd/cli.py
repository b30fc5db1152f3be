"""The ``vmcloud`` command."""
import argparse
import sys

from oslo_config import cfg

import vmcloud.conf
from vmcloud import exception
from vmcloud.cmd import cloud
from vmcloud.cmd import demo
from vmcloud.cmd import image
from vmcloud.cmd import mirror
from vmcloud.cmd import service
from vmcloud.cmd import simulate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='vmcloud', description='Deploy and snapshot many virtual machines at once.')
    parser.add_argument('--config-file', action='append', default=[], metavar='PATH',
                        help='configuration file (may be repeated)')
    parser.add_argument('--config-dir', metavar='DIR',
                        help='directory of *.conf files read after --config-file')
    groups = parser.add_subparsers(dest='group', required=True, metavar='COMMAND')
    image.add_parser(groups)
    mirror.add_parser(groups)
    cloud.add_parsers(groups)
    service.add_parsers(groups)
    demo.add_parser(groups)
    simulate.add_parser(groups)
    return parser


def load_config(args: argparse.Namespace) -> cfg.ConfigOpts:
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
    return conf


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cloud.check(args, parser)
    if getattr(args, 'log', False):
        service.setup_logging()
    try:
        conf = load_config(args)
        return args.handler(conf, args) or 0
    except exception.VmcloudError as exc:
        print(f'vmcloud: error: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('vmcloud: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
