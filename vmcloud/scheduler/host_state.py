"""What the scheduler knows about hosts and what a request asks for.

The dispatcher builds HostStates from the database (real compute managers) or
from the simulation engine (simulated MIPS nodes); filters and weighers see
only these, so the same plugins place instances on both.
"""
import dataclasses


@dataclasses.dataclass
class HostState:
    name: str
    up: bool
    vcpus_total: int
    vcpus_used: int
    memory_mib_total: int
    memory_mib_used: int
    disk_bytes_free: int
    instance_count: int
    # Simulated hosts and hosts that report it: processing capacity in MIPS.
    mips_total: int = 0
    mips_used: int = 0

    @property
    def vcpus_free(self) -> int:
        return self.vcpus_total - self.vcpus_used

    @property
    def memory_mib_free(self) -> int:
        return self.memory_mib_total - self.memory_mib_used

    def consume(self, request: 'InstanceRequest') -> None:
        """Account for one instance placed here, so the next pick of a request sees it."""
        self.vcpus_used += request.vcpus
        self.memory_mib_used += request.memory_mib
        self.disk_bytes_free -= request.disk_bytes
        self.instance_count += 1
        self.mips_used += request.mips


@dataclasses.dataclass(frozen=True)
class InstanceRequest:
    """The resources one instance needs."""

    vcpus: int
    memory_mib: int
    disk_bytes: int = 0
    mips: int = 0
    # The hosts of the deployment's cloud (None: any host), read by the cloud filter.
    cloud_hosts: tuple[str, ...] | None = None
