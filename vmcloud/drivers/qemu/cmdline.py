"""The qemu-system command line for an instance."""
from vmcloud.drivers import base
from vmcloud.drivers import nbd_uri


def drive(spec: base.InstanceSpec) -> str:
    if nbd_uri.is_nbd(spec.disk):
        # qemu parses nbd:// and nbd+unix:// URIs itself; NBD exports are raw.
        return f'file={spec.disk},format=raw,if=virtio,cache=none,aio=threads'
    path = spec.disk.replace(',', ',,')
    return f'file={path},format={spec.disk_format},if=virtio,cache=writeback'


def build(binary: str, spec: base.InstanceSpec, accelerator: str, qmp_socket: str,
          console_log: str) -> list[str]:
    command = [
        binary, '-name', spec.name,
        '-machine', f'pc,accel={accelerator}',
        '-nodefaults', '-no-user-config', '-display', 'none',
        '-m', str(spec.memory_mib), '-smp', str(spec.vcpus),
        '-serial', f'file:{console_log}',
        '-qmp', f'unix:{qmp_socket},server=on,wait=off',
        '-drive', drive(spec),
    ]
    if accelerator == 'kvm':
        command += ['-cpu', 'host']
    if spec.kernel:
        command += ['-kernel', spec.kernel, '-append', spec.cmdline]
        if spec.initrd:
            command += ['-initrd', spec.initrd]
    return command
