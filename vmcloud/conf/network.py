from oslo_config import cfg

network_group = cfg.OptGroup(
    'network', title='Guest networks',
    help='One isolated layer-2 network per deployment: a bridge per network on each '
         'compute host, VXLAN between the hosts, a DHCP server (dnsmasq) per network and '
         'host, and the health checks that reach guests from the host\'s side.')

network_opts = [
    cfg.StrOpt('agent', default='linux',
               choices=(('linux', 'bridges, VXLAN devices and dnsmasq in namespaces, '
                                  'made on the host (needs root)'),
                        ('fake', 'networks modelled in memory on the guests of the fake '
                                 'and sim drivers; nothing is made on the host')),
               help='What builds the guest networks on a compute host. The fake is for the '
                    'fake and sim drivers and for tests: their guests have no real NIC.'),
    cfg.StrOpt('state_dir', default='',
               help='Directory of the network agent\'s records (one JSON file per network '
                    'on this host) and of its dnsmasq files; empty means '
                    '$state_path/network. Compute managers of one machine share it, so '
                    'they share each network\'s bridge.'),
    cfg.StrOpt('vtep_address', default='',
               help='This host\'s address for VXLAN tunnels (the local end of every '
                    'network\'s VXLAN device, and what other hosts send its guests\' '
                    'frames to). Empty: no VXLAN, guests reach only guests of this host '
                    '(an all-in-one cloud).'),
    cfg.PortOpt('vxlan_port', default=4789,
                help='UDP port of VXLAN, the same on every host (4789 is IANA\'s).'),
    cfg.IntOpt('mtu', default=1450, min=576, max=65535,
               help='MTU of each network\'s bridge, VXLAN device and DHCP port. VXLAN '
                    'adds 50 bytes to each frame: 1450 fits a 1500-byte link.'),
    cfg.StrOpt('dnsmasq', default='dnsmasq',
               help='The dnsmasq program each network\'s DHCP server runs.'),
    cfg.IntOpt('dhcp_lease', default=86400, min=120,
               help='Seconds a DHCP lease lasts (a guest renews it half-way).'),
    cfg.StrOpt('cidr_pool', default='10.200.0.0/16',
               help='The range the dispatcher carves each deployment\'s subnet from.'),
    cfg.IntOpt('prefix_length', default=24, min=8, max=29,
               help='Prefix length of each deployment\'s subnet.'),
    cfg.IntOpt('vni_min', default=1000, min=1, max=999999,
               help='Lowest VXLAN network identifier given to a network.'),
    cfg.IntOpt('vni_max', default=999999, min=1, max=999999,
               help='Highest VXLAN network identifier given to a network: device names '
                    '(vmcb<vni>) are at most 15 characters, so at most 6 digits.'),
    cfg.FloatOpt('health_interval', default=0.5, min=0.01,
                 help='Seconds between two health probes of a guest that is not ready yet.'),
    cfg.FloatOpt('health_probe_timeout', default=3.0, min=0.1,
                 help='Seconds one health probe (a TCP connection, an HTTP GET) may take.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(network_group)
    conf.register_opts(network_opts, group=network_group)


def list_opts() -> dict:
    return {network_group: network_opts}
