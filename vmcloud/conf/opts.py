"""Entry point for oslo-config-generator: every option vmcloud and its plugins declare."""
from stevedore import extension

from vmcloud.conf import compute
from vmcloud.conf import mirror
from vmcloud.conf import paths
from vmcloud.conf import scheduler
from vmcloud.conf import service
from vmcloud.conf import storage
from vmcloud.conf import warehouse

_CONF_MODULES = (paths, storage, warehouse, compute, mirror, scheduler, service)

# Plugin namespaces whose classes declare their own options as
# ``OPTION_GROUP`` and ``OPTIONS`` class attributes.
_PLUGIN_NAMESPACES = ('vmcloud.storage.backends', 'vmcloud.drivers')


def _plugin_opts():
    for namespace in _PLUGIN_NAMESPACES:
        manager = extension.ExtensionManager(namespace, invoke_on_load=False)
        for ext in sorted(manager, key=lambda e: e.name):
            group = getattr(ext.plugin, 'OPTION_GROUP', None)
            if group is not None:
                yield group, list(ext.plugin.OPTIONS)


def list_opts():
    result = []
    for module in _CONF_MODULES:
        result.extend(module.list_opts().items())
    result.extend(_plugin_opts())
    return result
