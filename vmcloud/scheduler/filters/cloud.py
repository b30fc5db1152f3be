"""Pass only the hosts of the request's cloud, when the cloud lists its hosts.

The dispatcher's requests name the hosts of the deployment's cloud in
``cloud_hosts`` (None or empty: a cloud that lists none, as ``default``, spans every
host); the simulation's and the consolidation's requests name none.
"""
from vmcloud.scheduler import filters
from vmcloud.scheduler.host_state import HostState
from vmcloud.scheduler.host_state import InstanceRequest


class CloudHostsFilter(filters.BaseFilter):
    def host_passes(self, host: HostState, request: InstanceRequest) -> bool:
        cloud_hosts = request.cloud_hosts
        return not cloud_hosts or host.name in cloud_hosts
