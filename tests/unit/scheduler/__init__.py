"""Scheduler tests; ``host()`` builds the HostStates they place on."""
from vmcloud.scheduler.host_state import HostState


def host(name: str = 'h1', **kw) -> HostState:
    """A host that is up and empty: 8 vCPUs, 16 GiB RAM, 100 GiB disk, no MIPS."""
    values = dict(up=True, vcpus_total=8, vcpus_used=0, memory_mib_total=16384,
                  memory_mib_used=0, disk_bytes_free=100 * 1024 ** 3, instance_count=0)
    values.update(kw)
    return HostState(name=name, **values)
