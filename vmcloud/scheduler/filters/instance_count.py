"""Pass hosts running fewer than ``[scheduler] max_instances_per_host`` instances."""
from oslo_config import cfg

from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class InstanceCountFilter(filters.BaseFilter):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self.max_instances = conf.scheduler.max_instances_per_host

    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        return host.instance_count < self.max_instances
