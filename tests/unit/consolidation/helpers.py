"""Tiny clusters built by hand for the policy tests."""
import numpy as np

from vmcloud.sim import cluster as cluster_module
from vmcloud.sim import model
from vmcloud.sim import power

LINEAR = power.SpecPowerModel('linear', tuple(100.0 + 10 * i for i in range(11)))
HOST_1000 = model.HostType('h1000', 1, 1000, 4096, 1_000_000, LINEAR)


def vm(mips=1000, ram=100):
    return model.VmType(f'vm{mips}-{ram}', mips, ram, 0)


def make(hosts, vms, placement, req, hist=None, util_mips=None):
    """A cluster with ``placement[v]`` the host of VM v and ``req[v]`` its MIPS request."""
    c = cluster_module.Cluster(hosts, vms)
    c.vm_ram_req[:] = 0
    c.vm_bw_req[:] = 0
    c.vm_req = np.asarray(req, dtype=float)
    c.vm_util = c.vm_req / c.vm_mips
    if hist is not None:
        for v, values in enumerate(hist):
            c.vm_hist[v, :len(values)] = values
            c.vm_hist_len[v] = len(values)
    for v, h in enumerate(placement):
        c.vm_host[v] = h
        c.host_vms[h].append(v)
    c.recompute()
    if util_mips is None:
        util_mips = np.bincount(np.asarray(placement), c.vm_req, minlength=len(hosts))
    c.measured(np.asarray(util_mips, dtype=float))
    return c
