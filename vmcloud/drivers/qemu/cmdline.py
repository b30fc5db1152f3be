"""The qemu-system command line for an instance."""
from typing import Sequence

from vmcloud.drivers import base
from vmcloud.drivers import nbd_uri


def drive(spec: base.InstanceSpec) -> str:
    if nbd_uri.is_nbd(spec.disk):
        # qemu parses nbd:// and nbd+unix:// URIs itself; NBD exports are raw.
        return f'file={spec.disk},format=raw,if=virtio,cache=none,aio=threads'
    path = spec.disk.replace(',', ',,')
    return f'file={path},format={spec.disk_format},if=virtio,cache=writeback'


def nic(spec: base.InstanceSpec, index: int, mtu: int) -> list[str]:
    """NIC ``index`` of ``spec`` on its tap (made by the driver beforehand, so qemu
    runs no script). ``host_mtu`` tells the guest the bridge's MTU: without it the
    guest sends 1500-byte frames that a smaller bridge drops."""
    mac = spec.nics[index].mac
    return ['-netdev', f'tap,id=net{index},ifname={base.tap_name(spec.name, index)},'
                       'script=no,downscript=no',
            '-device', f'virtio-net-pci,netdev=net{index},mac={mac},host_mtu={mtu}']


def build(binary: str, spec: base.InstanceSpec, accelerator: str, qmp_socket: str,
          console_log: str, mtus: Sequence[int] = ()) -> list[str]:
    """``mtus``: the MTU of each of ``spec.nics``'s bridges, in order."""
    command = [
        binary, '-name', spec.name,
        '-machine', f'pc,accel={accelerator}',
        '-nodefaults', '-no-user-config', '-display', 'none',
        '-m', str(spec.memory_mib), '-smp', str(spec.vcpus),
        '-serial', f'file:{console_log}',
        '-qmp', f'unix:{qmp_socket},server=on,wait=off',
        '-drive', drive(spec),
    ]
    for index, (_, mtu) in enumerate(zip(spec.nics, mtus, strict=True)):
        command += nic(spec, index, mtu)
    if accelerator == 'kvm':
        command += ['-cpu', 'host']
    if spec.kernel:
        command += ['-kernel', spec.kernel, '-append', spec.cmdline]
        if spec.initrd:
            command += ['-initrd', spec.initrd]
    return command
