"""Entry point for oslo-config-generator: every option vmcloud and its plugins declare,
and the oslo.messaging options a cloud on several machines sets."""
import warnings

from stevedore import extension

from vmcloud.conf import api
from vmcloud.conf import compute
from vmcloud.conf import gateway
from vmcloud.conf import mirror
from vmcloud.conf import network
from vmcloud.conf import paths
from vmcloud.conf import replay
from vmcloud.conf import scheduler
from vmcloud.conf import service
from vmcloud.conf import storage
from vmcloud.conf import warehouse

_CONF_MODULES = (paths, storage, warehouse, compute, mirror, network, scheduler, service,
                 gateway, api, replay)

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


# oslo.messaging's groups for the transport vmcloud runs on: transport_url and the RPC
# defaults, the rabbit driver (its TLS options among them), notifications. Not Kafka:
# oslo.messaging offers it for notifications only, and vmcloud's RPC needs RabbitMQ.
_MESSAGING_GROUPS = (None, 'DEFAULT', 'oslo_messaging_rabbit', 'oslo_messaging_notifications')


def _messaging_opts():
    with warnings.catch_warnings():
        # oslo.messaging imports oslo.service, whose eventlet backend warns on import.
        warnings.simplefilter('ignore')
        import oslo_messaging.opts
    for group, opts in oslo_messaging.opts.list_opts():
        if group in _MESSAGING_GROUPS:
            yield group or 'DEFAULT', list(opts)


def list_opts():
    result = []
    for module in _CONF_MODULES:
        result.extend(module.list_opts().items())
    result.extend(_plugin_opts())
    result.extend(_messaging_opts())
    return result
