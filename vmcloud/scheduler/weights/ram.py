"""Rank hosts by free RAM; ``[scheduler] ram_weight_multiplier`` picks spread or stack."""
from oslo_config import cfg

from vmcloud.scheduler import weights
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class RamWeigher(weights.BaseWeigher):
    def multiplier(self, conf: cfg.ConfigOpts) -> float:
        return conf.scheduler.ram_weight_multiplier

    def weigh(self, host: HostState, request: InstanceRequest) -> float:
        return host.memory_mib_free
