"""Pass hosts with enough free RAM, over-committed by ``[scheduler] ram_allocation_ratio``."""
from oslo_config import cfg

from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class RamFilter(filters.BaseFilter):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self.ratio = conf.scheduler.ram_allocation_ratio

    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        # The ratio scales the capacity, not what is already used.
        free = host.memory_mib_total * self.ratio - host.memory_mib_used
        return free >= request.memory_mib
