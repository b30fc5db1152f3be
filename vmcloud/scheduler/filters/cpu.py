"""Pass hosts with enough free vCPUs (over-committed by ``[scheduler] cpu_allocation_ratio``)
and, for requests that ask for processing capacity, enough free MIPS.
"""
from oslo_config import cfg

from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class CpuFilter(filters.BaseFilter):
    def __init__(self, conf: cfg.ConfigOpts) -> None:
        super().__init__(conf)
        self.ratio = conf.scheduler.cpu_allocation_ratio

    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        if host.vcpus_total * self.ratio - host.vcpus_used < request.vcpus:
            return False
        # MIPS are not over-committed: they model real throughput, and a host
        # that does not report them cannot take a request that needs them.
        if request.mips > 0:
            return host.mips_total - host.mips_used >= request.mips
        return True
