from oslo_config import cfg

compute_group = cfg.OptGroup(
    'compute', title='Compute node',
    help='The hypervisor driver of a compute node and where its instances live: what '
         'every driver shares.')

compute_opts = [
    cfg.StrOpt('driver', default='qemu',
               help='Hypervisor driver (entry point in the vmcloud.drivers namespace): '
                    'qemu, libvirt, fake, sim or replay. Each declares its own options in '
                    'a group of its name ([qemu], [libvirt], [sim], [replay]).'),
    cfg.StrOpt('instances_path', default='$state_path/instances',
               help='Directory of per-instance runtime files: console log, QMP socket.'),
    cfg.StrOpt('boot_artifacts_path', default='$state_path/boot-artifacts',
               help='Directory of the node\'s copies of boot artifacts (kernels, initrds) '
                    'that deployments name as warehouse images: each pinned version is '
                    'fetched once and shared by every instance of the node.'),
    cfg.StrOpt('accelerator', default='auto', choices=('auto', 'kvm', 'tcg'),
               help='For the qemu and libvirt drivers: auto boots a guest under KVM once '
                    'per host boot and uses KVM only if it really boots: /dev/kvm '
                    'existing is not enough (nested hypervisors may expose one that '
                    'cannot run a stock kernel).'),
    cfg.IntOpt('accelerator_probe_timeout', default=10, min=1,
               help='Seconds the KVM probe waits for the probe kernel to reach init.'),
    cfg.IntOpt('boot_timeout', default=300, min=1,
               help='Seconds a new instance gets to pass its readiness check (its '
                    'deployment\'s health check; by default, to print boot-done) before its '
                    'build fails (and is retried on another host), unless the check names '
                    'its own timeout.'),
    cfg.IntOpt('stop_timeout', default=30, min=0,
               help='Seconds a guest gets to power off after an ACPI power-button press '
                    'before it is stopped by force.'),
    cfg.BoolOpt('sync_before_freeze', default=True,
                help='Make each mirror\'s writes durable while its guest still runs, just '
                     'before a snapshot freezes it: the freeze then has little left to '
                     'flush, so the guest\'s pause does not grow with the data it wrote. '
                     'Off only to measure that pause without it.'),
    cfg.StrOpt('load_cgroup', default='',
               help='A cgroup v2 directory (e.g. /sys/fs/cgroup/vmcloud) holding this '
                    'host\'s processes and guests: the CPU load every heartbeat reports '
                    '(which the gateway weighs the host\'s instances by) is then their '
                    'CPU time (its cpu.stat usage_usec) against wall time x load_cpus. '
                    'Empty: the whole machine\'s, from /proc/stat. Set it when hosts '
                    'share one kernel (containers), or each reports the load of all.'),
    cfg.IntOpt('load_cpus', default=0, min=0,
               help='Logical CPUs this host reports, and the CPUs load_cgroup\'s usage '
                    'is a fraction of. 0: the machine\'s (os.cpu_count()).'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(compute_group)
    conf.register_opts(compute_opts, group=compute_group)


def list_opts() -> dict:
    return {compute_group: compute_opts}
