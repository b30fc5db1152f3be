"""How the dispatcher talks to compute managers."""
from oslo_config import cfg

from vmcloud import rpc

TOPIC = 'vmcloud-compute'


class ComputeAPI:
    def __init__(self, conf: cfg.ConfigOpts):
        self._client = rpc.Client(conf, TOPIC, 'compute manager', retry=-1)

    def build_instance(self, host: str, instance: dict) -> None:
        """Start building; the result comes back as instance_built or build_failed.

        ``instance`` carries its build ``attempt``: the manager first asks the dispatcher
        (build_wanted) and drops a stale request, reporting nothing.
        """
        self._client.cast('build_instance', server=host, instance=instance)

    def destroy_instance(self, host: str, name: str) -> None:
        """Destroy guest, mirror and directory; confirmed with instance_destroyed."""
        self._client.cast('destroy_instance', server=host, name=name)

    def set_network_peers(self, host: str, network_id: str, peers: list[str]) -> None:
        """Replace the VTEP addresses ``host`` floods the network's frames to (an
        instance of its deployment moved); a host without the network ignores it."""
        self._client.cast('set_network_peers', server=host, network_id=network_id,
                          peers=peers)

    def freeze(self, host: str, snapshot_id: str, names: list[str], pause_limit: float,
               timeout: float) -> dict:
        """Sync each guest's disk, then pause them all with their writes flushed; each
        thaws by itself ``pause_limit`` s later unless barrier_and_thaw or thaw came.

        :returns: {name: {'frozen_at': epoch seconds} | {'error': str}}, within
            ``timeout`` s (a guest not frozen by then is an error, and thawed).
        :raises: MessagingError if the host does not answer within ``timeout`` s.
        """
        return self._client.call('freeze', server=host, timeout=timeout,
                                 snapshot_id=snapshot_id, names=names,
                                 pause_limit=pause_limit, freeze_timeout=timeout)

    def barrier_and_thaw(self, host: str, snapshot_id: str, items: list[dict]) -> dict:
        """Take each frozen mirror's dirty set, resume the guests, upload in the background
        (each item's result comes as snapshot_item_done).

        ``items``: [{'instance_id', 'name', 'target'}], ``target`` the image whose new
        version the snapshot of that instance becomes.

        :returns: {name: {'pause_ms': float, 'dirty_bytes': int, 'thawed_at': epoch s}
            | {'error': str}}; a guest whose pause limit passed: {'error': 'freeze
            expired ...'}.
        """
        return self._client.call('barrier_and_thaw', server=host, snapshot_id=snapshot_id,
                                 items=items)

    def thaw(self, host: str, snapshot_id: str) -> dict:
        """Abort: resume every guest frozen for ``snapshot_id``. :returns: {name: '' | error}."""
        return self._client.call('thaw', server=host, snapshot_id=snapshot_id)

    def console_log(self, host: str, name: str, max_bytes: int) -> str:
        """The last ``max_bytes`` bytes at most of guest ``name``'s console.

        :raises: InstanceNotFound.
        """
        return self._client.call('console_log', server=host, name=name, max_bytes=max_bytes)
