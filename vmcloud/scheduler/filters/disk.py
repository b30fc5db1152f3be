"""Pass hosts with enough free disk for the request's local disk."""
from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class DiskFilter(filters.BaseFilter):
    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        return host.disk_bytes_free >= request.disk_bytes
