"""The options that connect several machines are in the sample, and the docs that tell
an operator what to set name only options that exist, with values that convert."""
import os
import re
from importlib import metadata

from oslo_config import cfg

from tests import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
GENERATOR_CONF = os.path.join(REPO, 'etc', 'vmcloud', 'vmcloud-config-generator.conf')
SAMPLE = os.path.join(REPO, 'etc', 'vmcloud', 'vmcloud.conf.sample')
DOCS = ('README.md', 'doc/deployment.md', 'doc/services.md')

# What a cloud on several machines sets (issue 13): the bus, the warehouse's URL,
# credentials and TLS on every link.
SEVERAL_MACHINES = {
    'DEFAULT': {'transport_url', 'host', 'rpc_connect_retries', 'rpc_startup_timeout'},
    'database': {'connection'},
    'storage': {'backend'},
    'storage_http': {'url', 'token', 'ca_file'},
    'warehouse_service': {'host', 'port', 'token', 'cert_file', 'key_file'},
    'storage_rados': {'conffile', 'client_name', 'keyring', 'pool'},
    'oslo_messaging_rabbit': {'ssl', 'ssl_ca_file', 'ssl_cert_file', 'ssl_key_file'},
    'mirror': {'mirrors_path', 'cache_path', 'nbd_socket'},
}

# `[group] option`, then maybe more options of that group: `, `other``, `/`other``.
_INLINE = re.compile(r'`\[(\w+)\] (\w+)`((?:\s*(?:,|/|and)\s*`\w+`)*)')
_FOLLOWING = re.compile(r'`(\w+)`')
_INI_BLOCK = re.compile(r'^```ini\n(.*?)^```', re.S | re.M)


def generator_namespaces() -> list[str]:
    """The namespaces `tox -e genconfig` writes into the sample (a key oslo-config-generator
    repeats, which configparser cannot read)."""
    return [line.split('=', 1)[1].strip() for line in _read(GENERATOR_CONF).splitlines()
            if line.split('=', 1)[0].strip() == 'namespace']


def sample_options() -> dict[str, list[cfg.Opt]]:
    """Every option the sample lists, by group name: what oslo-config-generator loads."""
    found: dict[str, list[cfg.Opt]] = {}
    points = {e.name: e for e in metadata.entry_points(group='oslo.config.opts')}
    for namespace in generator_namespaces():
        for group, opts in points[namespace].load()():
            name = getattr(group, 'name', group) or 'DEFAULT'
            found.setdefault(name, []).extend(opts)
    return found


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class SampleTest(base.TestCase):
    def test_the_options_of_several_machines_are_in_the_sample(self):
        registered = {group: {o.dest for o in opts} for group, opts in sample_options().items()}
        for group, names in SEVERAL_MACHINES.items():
            self.assertLessEqual(names, registered.get(group, set()), group)

    def test_the_committed_sample_shows_them(self):
        sample = _read(SAMPLE)
        for group, names in SEVERAL_MACHINES.items():
            self.assertIn(f'\n[{group}]\n', '\n' + sample)
            section = sample.split(f'[{group}]\n', 1)[1].split('\n[', 1)[0]
            for name in names:
                self.assertIsNotNone(re.search(rf'(?m)^#{name} =', section),
                                     f'[{group}] {name} is not in the sample')


class DocsTest(base.TestCase):
    """README.md and the deployment notes: every option they name exists, and every
    ``ini`` block is a config oslo.config reads with every value converting."""

    def setUp(self):
        super().setUp()
        self.known = sample_options()

    def names(self, group: str) -> set[str]:
        return {o.dest for o in self.known.get(group, [])}

    def test_every_option_named_inline_exists(self):
        checked = 0
        for doc in DOCS:
            for match in _INLINE.finditer(_read(os.path.join(REPO, doc))):
                group, first, rest = match.groups()
                for name in [first, *_FOLLOWING.findall(rest)]:
                    self.assertIn(name, self.names(group), f'{doc}: [{group}] {name}')
                    checked += 1
        self.assertGreater(checked, 30)  # the pattern still finds them

    def test_every_ini_block_is_a_valid_config(self):
        blocks = 0
        for doc in DOCS:
            for number, block in enumerate(_INI_BLOCK.findall(_read(os.path.join(REPO, doc)))):
                self.check_block(f'{doc} ini block {number + 1}', block)
                blocks += 1
        self.assertGreaterEqual(blocks, 8)

    def check_block(self, where: str, text: str) -> None:
        conf = cfg.ConfigOpts()
        for group, opts in self.known.items():
            conf.register_opts(opts, group=None if group == 'DEFAULT' else group)
        path = os.path.join(self.tmp, 'block.conf')
        with open(path, 'w') as f:
            f.write(text)
        conf(['--config-file', path], project='vmcloud', default_config_files=[])
        group = None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            if line.startswith('['):
                group = line.strip('[]')
                self.assertIn(group, self.known, f'{where}: [{group}]')
                continue
            self.assertIsNotNone(group, f'{where}: {line!r} outside a section')
            name, _, value = (part.strip() for part in line.partition('='))
            self.assertIn(name, self.names(group), f'{where}: [{group}] {name}')
            # oslo.config keeps an inline comment as part of the value.
            self.assertNotIn(' #', value, f'{where}: [{group}] {name}')
            try:
                (conf if group == 'DEFAULT' else conf[group])[name]
            except (cfg.ConfigFileValueError, ValueError) as exc:
                self.fail(f'{where}: [{group}] {name} = {value}: {exc}')
