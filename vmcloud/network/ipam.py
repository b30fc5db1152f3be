"""Address management of guest networks, as pure functions of what is in use: which
subnet, VNI, address and MAC a new network or port gets. The dispatcher reads what is
in use from the database and writes what these pick in the same unit of work; the
database's unique constraints make sure two dispatchers never hand out one twice."""
import ipaddress
from collections.abc import Iterator

from vmcloud import exception

# QEMU/KVM's prefix: locally unique by convention, and what libvirt gives guests too.
MAC_PREFIX = '52:54:00'


def _network(cidr: str) -> ipaddress.IPv4Network:
    """:raises: ConfigError if ``cidr`` is not an IPv4 network."""
    try:
        return ipaddress.IPv4Network(cidr)
    except ValueError as exc:
        raise exception.ConfigError(f'bad network {cidr!r}: {exc}') from exc


def next_subnet(pool_cidr: str, prefix: int, used: set[str]) -> str:
    """The first /``prefix`` subnet of ``pool_cidr`` not in ``used`` (CIDR strings).

    The pool may be at most a /8, so that every address of it differs from every other
    in its low 24 bits, which mac_for relies on.

    :raises: AddressPoolExhausted naming the pool if every subnet is used; ConfigError
        if the pool is not an IPv4 network of at most 2**24 addresses, or ``prefix`` does
        not fit in it or leaves no room for the gateway, a guest and a DHCP server.
    """
    pool = _network(pool_cidr)
    if pool.prefixlen < 8:
        raise exception.ConfigError(f'cidr pool {pool_cidr} is larger than a /8')
    if not pool.prefixlen <= prefix <= 29:
        raise exception.ConfigError(f'a /{prefix} subnet cannot be carved from cidr pool '
                                    f'{pool_cidr} (between /{pool.prefixlen} and /29)')
    taken = {str(_network(cidr)) for cidr in used}
    for subnet in pool.subnets(new_prefix=prefix):
        if str(subnet) not in taken:
            return str(subnet)
    raise exception.AddressPoolExhausted(
        f'no free /{prefix} subnet left in cidr pool {pool_cidr}: all '
        f'{2 ** (prefix - pool.prefixlen)} are in use')


def next_vni(low: int, high: int, used: set[int]) -> int:
    """The lowest VXLAN network identifier of ``low``..``high`` not in ``used``.

    :raises: AddressPoolExhausted naming the range if every one is used.
    """
    for vni in range(low, high + 1):
        if vni not in used:
            return vni
    raise exception.AddressPoolExhausted(
        f'no free VNI left in {low}..{high}: all {max(high - low + 1, 0)} are in use')


def _hosts(network: ipaddress.IPv4Network) -> range:
    """The integer addresses guests and DHCP servers may have: neither the network's own
    address, nor its first (kept for the gateway), nor its broadcast address."""
    return range(int(network.network_address) + 2, int(network.broadcast_address))


def _first_free(cidr: str, candidates: Iterator[int], used: set[str], what: str) -> str:
    taken = {int(ipaddress.IPv4Address(address)) for address in used}
    for candidate in candidates:
        if candidate not in taken:
            return str(ipaddress.IPv4Address(candidate))
    raise exception.AddressPoolExhausted(f'no free {what} address left in subnet {cidr}: '
                                         f'{len(taken)} are in use')


def gateway_address(cidr: str) -> str:
    """The gateway's address in subnet ``cidr``: its first host address (.1 of a /24),
    which next_address and next_dhcp_address never hand out.

    :raises: ConfigError if ``cidr`` is not an IPv4 network with a host address besides
        the gateway's (a /30 or larger).
    """
    network = _network(cidr)
    if network.prefixlen > 30:
        raise exception.ConfigError(f'subnet {cidr} has no room for a gateway address '
                                    f'(a /30 or larger is needed)')
    return str(network.network_address + 1)


def next_address(cidr: str, used: set[str]) -> str:
    """The lowest free address of subnet ``cidr`` from its second one (.2) up: an
    instance's port. ``used``: the addresses of every port of the subnet.

    :raises: AddressPoolExhausted naming the subnet if none is free.
    """
    return _first_free(cidr, iter(_hosts(_network(cidr))), used, 'instance')


def next_dhcp_address(cidr: str, used: set[str]) -> str:
    """The highest free address of subnet ``cidr`` below its broadcast address: a DHCP
    server's port (from the top down, away from the instances' addresses).

    :raises: AddressPoolExhausted naming the subnet if none is free.
    """
    return _first_free(cidr, reversed(_hosts(_network(cidr))), used, 'DHCP')


def mac_for(address: str, vni: int) -> str:
    """The MAC of the port with ``address`` in network ``vni``: 52:54:00 and the low 24
    bits of the address.

    Equal (vni, address) give equal MACs (a rebuilt guest keeps its MAC, so a lease or
    an ARP entry of it stays right). No two live ports share one: every live port's
    address is distinct (subnets of one pool do not overlap, addresses of one subnet
    are not reused while in use) and the pool is at most a /8 (next_subnet), so their
    low 24 bits are distinct. ``vni`` does not take part: mixing it in would break that
    guarantee, and a MAC is only ever seen on its own network's segment.
    """
    if not 0 < vni < 1 << 24:
        raise exception.ConfigError(f'VNI {vni} is not a 24-bit VXLAN network identifier')
    low = int(ipaddress.IPv4Address(address)) & 0xFFFFFF
    return f'{MAC_PREFIX}:{low >> 16:02x}:{(low >> 8) & 0xff:02x}:{low & 0xff:02x}'
