"""States of instances, deployments and snapshots, shared by the dispatcher and its clients."""

BUILDING, ACTIVE, ERROR, DELETED = 'building', 'active', 'error', 'deleted'
RUNNING_STATES = (BUILDING, ACTIVE)

# Snapshots and their items (ERROR as above).
FREEZING, UPLOADING, AVAILABLE, PARTIAL = 'freezing', 'uploading', 'available', 'partial'
