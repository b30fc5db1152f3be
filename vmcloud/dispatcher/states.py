"""States of instances, hosts, deployments and snapshots, shared by the dispatcher and
its clients."""

BUILDING, ACTIVE, ERROR, DELETED = 'building', 'active', 'error', 'deleted'
# Its host stopped reporting: nothing is known of the guest until the host reports again.
UNKNOWN = 'unknown'
# Destroy asked, not yet confirmed by the host: the guest may still be using its resources.
DELETING = 'deleting'
# Instances wanted running.
RUNNING_STATES = (BUILDING, ACTIVE, UNKNOWN)
# With a host, these count against its capacity: a guest may be there, using it.
HOLDING_STATES = (BUILDING, ACTIVE, UNKNOWN, ERROR, DELETING)

# Compute hosts.
HOST_UP = 'up'
HOST_UNKNOWN = 'unknown'  # silent for service_down_time
HOST_FENCED = 'fenced'  # the operator said it is dead

# Snapshots and their items (ERROR as above).
FREEZING, UPLOADING, AVAILABLE, PARTIAL = 'freezing', 'uploading', 'available', 'partial'
