"""How the dispatcher talks to compute managers."""
from oslo_config import cfg

from vmcloud import rpc

TOPIC = 'vmcloud-compute'


class ComputeAPI:
    def __init__(self, conf: cfg.ConfigOpts):
        self._client = rpc.Client(conf, TOPIC, 'compute manager', retry=-1)

    def build_instance(self, host: str, instance: dict) -> None:
        """Start building; the result comes back as instance_built or build_failed."""
        self._client.cast('build_instance', server=host, instance=instance)

    def destroy_instance(self, host: str, name: str) -> None:
        self._client.cast('destroy_instance', server=host, name=name)

    def freeze(self, host: str, names: list[str]) -> dict:
        """Pause the guests with their writes flushed. :returns: {name: error or ''}."""
        return self._client.call('freeze', server=host, names=names)

    def barrier_and_thaw(self, host: str, snapshot_id: str, items: list[dict]) -> dict:
        """Take each mirror's dirty set, resume the guest, upload in the background.

        :returns: {instance name: {'pause_ms': float, 'dirty_bytes': int} or {'error': str}}.
        """
        return self._client.call('barrier_and_thaw', server=host, snapshot_id=snapshot_id,
                                 items=items)
