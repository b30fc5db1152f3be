"""The compute manager: one per node, running instances on mirrors with a driver."""
