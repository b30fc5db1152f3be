"""The compiled part of consolidation (``_kernels``, built at install) and a switch to leave it out.

Without a C compiler the install goes on without it; placement, the overload checks
and MC's R^2 then take their numpy paths, which decide the same, about twice as
slowly over a whole run. The numpy paths are also the reference the compiled code is
tested against, and the baseline the benchmark measures it against.
"""
import contextlib

try:
    from vmcloud.scheduler.consolidation import _kernels as kernels
except ImportError:
    kernels = None


@contextlib.contextmanager
def disabled():
    """Run the numpy paths only, within the block."""
    global kernels
    saved, kernels = kernels, None
    try:
        yield
    finally:
        kernels = saved
