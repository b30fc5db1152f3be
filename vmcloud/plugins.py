"""Loading named plugins from entry-point namespaces, failing loudly on unknown names."""
from typing import Any

from stevedore import driver
from stevedore import exception as stevedore_exc
from stevedore import extension

from vmcloud import exception


def available(namespace: str) -> list[str]:
    """Names of the plugins installed in ``namespace``, sorted."""
    return sorted(extension.ExtensionManager(namespace, invoke_on_load=False).names())


def load_class(namespace: str, name: str) -> type:
    """Return the plugin class registered as ``name`` in ``namespace``.

    :raises: PluginNotFound if no such plugin is installed.
    """
    try:
        manager = driver.DriverManager(namespace, name, invoke_on_load=False)
    except stevedore_exc.NoMatches as exc:
        raise exception.PluginNotFound(namespace, name, available(namespace)) from exc
    return manager.driver


def load(namespace: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiate the plugin ``name`` of ``namespace`` with the given arguments.

    :raises: PluginNotFound if no such plugin is installed.
    """
    return load_class(namespace, name)(*args, **kwargs)
