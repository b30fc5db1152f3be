"""A layer imports only layers below it: checked on the source, every import statement.

Imports inside functions count as well: a lazy import is still a dependency.
"""
import ast
import os

import testtools

import vmcloud

ROOT = os.path.dirname(os.path.abspath(vmcloud.__file__))


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import in ``source`` (the text of ``module``) may bind, absolute."""
    package = module if is_package else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1])
                target = f'{base}.{node.module}' if node.module else base
            else:
                target = node.module
            found.add(target)
            # ``from vmcloud import sim`` imports the module vmcloud.sim
            found.update(f'{target}.{alias.name}' for alias in node.names)
    return found


def modules_under(package: str):
    """(module name, path) of every .py file of ``package`` (dotted, within vmcloud)."""
    top = os.path.join(ROOT, *package.split('.')[1:])
    for folder, _, files in os.walk(top):
        for leaf in sorted(files):
            if leaf.endswith(('.py', '.pyx')):
                relative = os.path.relpath(os.path.join(folder, leaf), os.path.dirname(ROOT))
                name = relative.rsplit('.', 1)[0].replace(os.sep, '.')
                yield name.removesuffix('.__init__'), os.path.join(folder, leaf)


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for module, path in modules_under(package):
        with open(path) as f:
            source = f.read()
        if path.endswith('.pyx'):
            # Cython: only its Python-level import statements, cimports aside
            source = '\n'.join(line for line in source.splitlines()
                               if line.startswith(('import ', 'from ')) and ' cimport ' not in line)
        is_package = path.endswith('__init__.py')
        for imported in sorted(imported_modules(source, module, is_package)):
            if any(imported == f or imported.startswith(f + '.') for f in forbidden):
                found.append(f'{module} imports {imported}')
    return found


class ImportCheckerTest(testtools.TestCase):
    def test_it_sees_every_form_of_import(self):
        source = ('import vmcloud.sim.model\n'
                  'from vmcloud import sim\n'
                  'from ..mirror import disk\n'
                  'def later():\n'
                  '    from vmcloud.compute.manager import ComputeManager\n')
        found = imported_modules(source, 'vmcloud.storage.warehouse')
        self.assertIn('vmcloud.sim.model', found)
        self.assertIn('vmcloud.sim', found)
        self.assertIn('vmcloud.mirror.disk', found)
        self.assertIn('vmcloud.compute.manager', found)

    def test_it_walks_the_packages(self):
        names = [m for m, _ in modules_under('vmcloud.drivers')]
        self.assertIn('vmcloud.drivers.base', names)
        self.assertIn('vmcloud.drivers.qemu.driver', names)
        self.assertIn('vmcloud.scheduler.consolidation._kernels',
                      [m for m, _ in modules_under('vmcloud.scheduler.consolidation')])


class LayeringTest(testtools.TestCase):
    def test_drivers_do_not_import_the_simulator(self):
        self.assertEqual([], violations('vmcloud.drivers', ('vmcloud.sim',)))

    def test_consolidation_does_not_import_the_simulator(self):
        self.assertEqual([], violations('vmcloud.scheduler.consolidation', ('vmcloud.sim',)))

    def test_mirrors_do_not_import_drivers(self):
        # phase following belongs to the compute manager, which has both
        self.assertEqual([], violations('vmcloud.mirror', ('vmcloud.drivers',)))

    def test_storage_and_nbd_import_nothing_above_them(self):
        above = ('vmcloud.mirror', 'vmcloud.compute', 'vmcloud.dispatcher', 'vmcloud.drivers')
        for package in ('vmcloud.storage', 'vmcloud.nbd'):
            self.assertEqual([], violations(package, above), package)

    def test_the_gateway_imports_no_dispatcher_and_nothing_below_imports_it(self):
        # The gateway sits beside the dispatcher: each talks to the other over RPC only.
        self.assertEqual([], violations('vmcloud.gateway', ('vmcloud.dispatcher', 'vmcloud.cmd')))
        for package in ('vmcloud.compute', 'vmcloud.network', 'vmcloud.storage', 'vmcloud.mirror',
                        'vmcloud.drivers'):
            self.assertEqual([], violations(package, ('vmcloud.gateway',)), package)

    def test_the_dispatcher_knows_the_gateway_by_its_rpcapi_alone(self):
        found = violations('vmcloud.dispatcher', ('vmcloud.gateway',))
        self.assertEqual([], [v for v in found if not v.endswith((' vmcloud.gateway.rpcapi',
                                                                  ' vmcloud.gateway'))])

    def test_only_the_commands_import_the_api(self):
        # The API sits on top, beside the commands: nothing it serves may depend on it.
        for package in ('vmcloud.dispatcher', 'vmcloud.gateway', 'vmcloud.compute',
                        'vmcloud.network', 'vmcloud.storage', 'vmcloud.mirror', 'vmcloud.drivers',
                        'vmcloud.db', 'vmcloud.scheduler'):
            self.assertEqual([], violations(package, ('vmcloud.api',)), package)

    def test_the_api_knows_the_dispatcher_by_its_rpcapi_and_states_alone(self):
        found = violations('vmcloud.api', ('vmcloud.dispatcher', 'vmcloud.cmd',
                                           'vmcloud.compute', 'vmcloud.allinone'))
        allowed = (' vmcloud.dispatcher.rpcapi', ' vmcloud.dispatcher.states',
                   ' vmcloud.dispatcher')
        self.assertEqual([], [v for v in found if not v.endswith(allowed)])
