"""Pass only hosts whose compute service is up."""
from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class ComputeUpFilter(filters.BaseFilter):
    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        return host.up
