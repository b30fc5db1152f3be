from oslo_config import cfg

compute_group = cfg.OptGroup(
    'compute', title='Compute node',
    help='The hypervisor driver of a compute node and where its instances live.')

compute_opts = [
    cfg.StrOpt('driver', default='qemu',
               help='Hypervisor driver (entry point in the vmcloud.drivers namespace): '
                    'qemu, libvirt or fake.'),
    cfg.StrOpt('instances_path', default='$state_path/instances',
               help='Directory of per-instance runtime files: console log, QMP socket.'),
    cfg.StrOpt('qemu_binary', default='qemu-system-x86_64',
               help='QEMU system emulator, a name on PATH or an absolute path.'),
    cfg.StrOpt('libvirt_uri', default='qemu:///system',
               help='libvirt connection URI for the libvirt driver.'),
    cfg.StrOpt('libvirt_dac_label', default='+0:+0',
               help='user:group that libvirt runs qemu as (a static DAC label, no '
                    'relabelling). Empty for libvirt\'s own default user, which then must '
                    'be able to reach the instances path, the disks and the NBD sockets.'),
    cfg.StrOpt('accelerator', default='auto', choices=('auto', 'kvm', 'tcg'),
               help='auto boots a guest under KVM once per host boot and uses KVM only '
                    'if it really boots: /dev/kvm existing is not enough (nested '
                    'hypervisors may expose one that cannot run a stock kernel).'),
    cfg.IntOpt('accelerator_probe_timeout', default=10, min=1,
               help='Seconds the KVM probe waits for the probe kernel to reach init.'),
    cfg.IntOpt('boot_timeout', default=300, min=1,
               help='Seconds a new instance gets to print boot-done before its build '
                    'fails (and is retried on another host).'),
    cfg.IntOpt('stop_timeout', default=30, min=0,
               help='Seconds a guest gets to power off after an ACPI power-button press '
                    'before it is stopped by force.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(compute_group)
    conf.register_opts(compute_opts, group=compute_group)


def list_opts() -> dict:
    return {compute_group: compute_opts}
