"""Errors of the simulator."""
from vmcloud import exception


class SimulationError(exception.VmcloudError):
    """A simulation cannot be set up or run as asked."""


class WorkloadNotFound(SimulationError):
    """The named trace day does not exist."""


class UnknownPolicy(SimulationError):
    """The named consolidation policy is not installed."""
