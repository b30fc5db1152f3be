"""Rank hosts by free vCPUs; ``[scheduler] cpu_weight_multiplier`` picks spread or stack."""
from oslo_config import cfg

from vmcloud.scheduler import weights
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class CpuWeigher(weights.BaseWeigher):
    def multiplier(self, conf: cfg.ConfigOpts) -> float:
        return conf.scheduler.cpu_weight_multiplier

    def weigh(self, host: HostState, request: InstanceRequest) -> float:
        return host.vcpus_free
