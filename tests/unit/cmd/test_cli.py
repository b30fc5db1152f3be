"""The ``vmcloud`` command's own behaviour: lazy subcommands and configuration errors."""
import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from unittest import mock

from tests import base
from vmcloud.cmd import cli
from vmcloud.cmd import image
from vmcloud.drivers import base as driver_base

# Modules the services need and ``--help`` or ``image list`` do not.
HEAVY = ('oslo_messaging', 'sqlalchemy', 'alembic', 'libvirt', 'numpy')


def modules_loaded_by(*argv: str) -> set[str]:
    """The HEAVY modules a fresh interpreter holds after parsing ``argv`` as the CLI does."""
    script = (
        'import json, sys\n'
        'from vmcloud.cmd import cli\n'
        f'parser, _ = cli.build_parser({list(argv)!r})\n'
        'try:\n'
        f'    parser.parse_args({list(argv)!r})\n'
        'except SystemExit:\n'
        '    pass\n'
        f'print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


class LazyCommandsTest(base.TestCase):
    def test_help_imports_no_service_module(self):
        self.assertEqual(set(), modules_loaded_by('--help'))

    def test_image_list_imports_no_service_module(self):
        self.assertEqual(set(), modules_loaded_by('image', 'list'))

    def test_a_service_command_loads_its_module(self):
        # The check above would pass if nothing were ever imported: a command that
        # needs the message bus must get it.
        self.assertIn('oslo_messaging', modules_loaded_by('hosts'))

    def test_help_lists_every_command(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit):
            cli.main(['--help'])
        # as words: argparse wraps a long help line
        listed = ' '.join(out.getvalue().split())
        for name, (_, help_text) in cli.COMMANDS.items():
            self.assertIn(f' {name} ', listed)
            self.assertIn(help_text, listed)

    def test_table_matches_the_modules(self):
        # Every command in the table is added by the module it names, with the same help.
        for name, (module_name, help_text) in cli.COMMANDS.items():
            groups = argparse.ArgumentParser().add_subparsers()
            cli._add_parsers(importlib.import_module(module_name), groups)
            actions = {a.dest: a.help for a in groups._choices_actions}
            self.assertEqual(help_text, actions.get(name), f'{name} in {module_name}')
            # and the module adds no command the table lacks: it could not be reached
            listed = {n for n, (m, _) in cli.COMMANDS.items() if m == module_name}
            self.assertEqual(listed, set(actions), module_name)

    def test_chosen_command_skips_option_values(self):
        self.assertEqual('image', cli.chosen_command(['--config-file', 'list', 'image', 'list']))
        self.assertEqual('hosts', cli.chosen_command(['--config-dir', 'd', 'hosts']))
        self.assertIsNone(cli.chosen_command(['--help']))
        self.assertEqual('image', cli.chosen_command(['--config-dir=d', 'image', 'list']))
        self.assertEqual('image', cli.chosen_command(['--', 'image', 'list']))

    def test_abbreviated_options_as_argparse_takes_them(self):
        for argv in (['--config-f', 'list', 'image', 'list'], ['--config-d', 'd', 'image', 'list']):
            parser, module = cli.build_parser(argv)
            self.assertEqual('vmcloud.cmd.image', module.__name__)
            self.assertEqual('list', parser.parse_args(argv).command)


class ConfigErrorsTest(base.TestCase):
    def run_cli(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(list(argv))
        return rc, err.getvalue()

    def test_bad_option_value_is_one_line(self):
        config = self.write_config(storage={'chunk_size': 'lots'})
        rc, err = self.run_cli('--config-file', config, 'image', 'list')
        self.assertEqual(1, rc)
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertIn('[storage] chunk_size', err)
        self.assertIn("'lots'", err)

    def test_bad_default_option_value_is_named(self):
        config = self.write_config(DEFAULT={'heartbeat_interval': 'often'})
        rc, err = self.run_cli('--config-file', config, 'image', 'list')
        self.assertEqual(1, rc)
        self.assertIn('heartbeat_interval', err)

    def test_bad_value_in_a_drivers_own_group_is_named(self):
        # [sim] is registered when the driver is loaded, after the file was checked
        def load_the_sim_driver(conf, args):
            driver_base.load(conf, 'sim')

        config = self.write_config(sim={'host_pes': 'lots'})
        with mock.patch.object(image, 'do_stats', load_the_sim_driver):
            rc, err = self.run_cli('--config-file', config, 'image', 'stats')
        self.assertEqual(1, rc)
        self.assertEqual("vmcloud: error: bad configuration: [sim] host_pes: invalid literal "
                         "for int() with base 10: 'lots'\n", err)

    def read_only_state_path(self) -> None:
        """Make state_path a read-only directory that already holds a warehouse."""
        os.makedirs(self.state_path)
        rc, err = self.run_cli('--config-file', self.write_config(), 'image', 'list')
        self.assertEqual(0, rc, err)
        if os.geteuid() != 0:
            for top, dirs, _ in os.walk(self.state_path):
                for name in dirs + ['.']:
                    os.chmod(os.path.join(top, name), 0o500)
            return
        # root ignores permission bits: a read-only filesystem is what root meets.
        subprocess.run(['mount', '-t', 'tmpfs', 'tmpfs', self.state_path], check=True)
        self.addCleanup(subprocess.run, ['umount', '-l', self.state_path], check=True)
        rc, err = self.run_cli('--config-file', self.write_config(), 'image', 'list')
        self.assertEqual(0, rc, err)
        subprocess.run(['mount', '-o', 'remount,ro', self.state_path], check=True)

    def test_read_only_state_path_is_one_line(self):
        self.read_only_state_path()
        image = os.path.join(self.tmp, 'disk.raw')
        with open(image, 'wb') as f:
            f.write(os.urandom(1 << 20))
        for argv in (['image', 'import', image, 'img'], ['mirror', 'serve', 'vm1', '--image',
                                                         'img']):
            rc, err = self.run_cli('--config-file', self.write_config(), *argv)
            self.assertEqual(1, rc, argv)
            self.assertEqual(1, len(err.splitlines()), err)
            self.assertIn(self.state_path, err)


class ExpandedTest(base.TestCase):
    def test_a_commands_older_form_is_rewritten_after_the_command(self):
        cloud = importlib.import_module('vmcloud.cmd.cloud')
        self.assertEqual(['--config-file', 'snapshot', 'snapshot', 'create', 'd1', '--wait'],
                         cli.expanded(['--config-file', 'snapshot', 'snapshot', 'd1', '--wait'],
                                      cloud))
        for argv in (['snapshot', 'list'], ['snapshot', 'show', 's1'], ['snapshot', '--help'],
                     ['snapshot'], ['list', 'd1'], ['--help']):
            self.assertEqual(argv, cli.expanded(argv, cloud))
        self.assertEqual(['image', 'list'], cli.expanded(['image', 'list'], image))
