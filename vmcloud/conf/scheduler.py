from oslo_config import cfg

scheduler_group = cfg.OptGroup(
    'scheduler', title='Scheduler',
    help='How instances are placed on hosts: which filters decide where an instance '
         'fits, and which weighers rank the hosts that remain.')

scheduler_opts = [
    cfg.ListOpt('enabled_filters',
                default=['cloud', 'compute_up', 'ram', 'cpu', 'disk', 'instance_count'],
                help='Filters (entry points in the vmcloud.scheduler.filters namespace) '
                     'a host must pass, run in this order: put cheap filters that '
                     'eliminate many hosts first. Leaving out cloud lets a deployment '
                     'of a cloud that lists its hosts be placed on any host.'),
    cfg.ListOpt('weighers', default=['ram', 'cpu'],
                help='Weighers (entry points in the vmcloud.scheduler.weights namespace) '
                     'that rank the hosts left after filtering.'),
    cfg.FloatOpt('ram_allocation_ratio', default=1.0, min=0.0,
                 help='Virtual RAM a host may hand out per MiB of physical RAM.'),
    cfg.FloatOpt('cpu_allocation_ratio', default=4.0, min=0.0,
                 help='Virtual CPUs a host may hand out per physical CPU.'),
    cfg.IntOpt('max_instances_per_host', default=50, min=1,
               help='Instances a host may run at most, whatever its free resources.'),
    cfg.FloatOpt('ram_weight_multiplier', default=1.0,
                 help='Weight of free RAM when ranking hosts: positive spreads instances '
                      'over the hosts with most free RAM, negative stacks them on the '
                      'fullest hosts that still fit, 0 ignores RAM.'),
    cfg.FloatOpt('cpu_weight_multiplier', default=1.0,
                 help='Weight of free vCPUs when ranking hosts: positive spreads, '
                      'negative stacks, 0 ignores vCPUs.'),
    cfg.IntOpt('max_attempts', default=3, min=1,
               help='Hosts an instance is tried on before its build fails: a build that '
                    'fails on one host is retried on another.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(scheduler_group)
    conf.register_opts(scheduler_opts, group=scheduler_group)


def list_opts() -> dict:
    return {scheduler_group: scheduler_opts}
