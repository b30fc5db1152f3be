"""Deployments' guest networks in the database: a network per deployment, a port per
instance, a DHCP port per host that runs an instance of it, what a build request
carries of them, and their release.

Every function works in its caller's unit of work; what ``vmcloud.network.ipam``
picks from what is in use is written there, so a deploy that cannot get a subnet, a
VNI or an address writes nothing (AddressPoolExhausted rolls the unit back).

Two dispatchers picking at once: within one network every pick is made with the
deployment's row locked (deploy creates it, a rebuild locks it with its instance), so
they cannot interleave; a new network's subnet and VNI are read unlocked, and two
deploys racing for one are told apart by the unique constraints of ``networks``: the
second's commit is refused (db_api.Conflict) with nothing written, and Deployer.deploy
runs it once more, then seeing the first's.
"""
import uuid

from oslo_config import cfg

from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import states
from vmcloud.network import ipam

# Port kinds.
INSTANCE, DHCP = 'instance', 'dhcp'


def allocate(conf: cfg.ConfigOpts, session: db_api.Session, deployment_id: str,
             instances: list[models.Instance]) -> models.Network:
    """A new network for the deployment, a port for each of ``instances`` (lowest free
    addresses first), a DHCP port for each host they are placed on (from the top down).

    :raises: AddressPoolExhausted naming the pool (the cidr pool, the VNI range or the
        subnet) that ran out.
    """
    cidrs, vnis = db_api.networks_in_use(session)
    network = db_api.network_create(
        session, id=str(uuid.uuid4()), deployment_id=deployment_id,
        cidr=ipam.next_subnet(conf.network.cidr_pool, conf.network.prefix_length, cidrs),
        vni=ipam.next_vni(conf.network.vni_min, conf.network.vni_max, vnis),
        state=states.ACTIVE)
    for instance in instances:
        _new_port(session, network, ipam.next_address, kind=INSTANCE,
                  instance_id=instance.id)
    for host in sorted({i.host for i in instances if i.host is not None}):
        dhcp_port(session, network, host)
    return network


def _new_port(session: db_api.Session, network: models.Network, pick, **fields) -> models.Port:
    used = {port.address for port in db_api.ports_of(session, network.id)}
    address = pick(network.cidr, used)
    return db_api.port_create(session, id=str(uuid.uuid4()), network_id=network.id,
                              address=address, mac=ipam.mac_for(address, network.vni),
                              **fields)


def dhcp_port(session: db_api.Session, network: models.Network, host: str) -> models.Port:
    """``host``'s DHCP port in the network, allocated if it has none yet.

    :raises: AddressPoolExhausted naming the subnet.
    """
    return (db_api.dhcp_port(session, network.id, host)
            or _new_port(session, network, ipam.next_dhcp_address, kind=DHCP, host=host))


def running_hosts(session: db_api.Session, deployment_id: str) -> list[str]:
    """The hosts of the deployment's instances wanted running, by name."""
    return sorted({i.host for i in db_api.instances_of(session, deployment_id)
                   if i.host is not None and i.state in states.RUNNING_STATES})


def peers(session: db_api.Session, deployment_id: str, host: str) -> list[str]:
    """The VTEP addresses of every other host running instances of the deployment (hosts
    without one, all-in-one, left out), and of every registered gateway if the
    deployment has a listener (its clients' connections come from there): where
    ``host`` sends the network's floods. Never ``host``'s own address (a gateway may
    share a machine with a compute host)."""
    others = [h for h in running_hosts(session, deployment_id) if h != host]
    addresses = set(db_api.vtep_addresses(session, others).values())
    deployment = db_api.deployment_get(session, deployment_id)
    if deployment is not None and deployment.listener_port is not None:
        addresses |= {g.vtep_address for g in db_api.gateways(session)}
    addresses.discard(db_api.vtep_addresses(session, [host]).get(host, ''))
    return sorted(address for address in addresses if address)


def gateway_peers(session: db_api.Session, deployment_id: str) -> list[str]:
    """The VTEP addresses of every host running instances of the deployment: where a
    gateway sends the network's floods."""
    hosts = running_hosts(session, deployment_id)
    return sorted({vtep for vtep in db_api.vtep_addresses(session, hosts).values() if vtep})


def listener_peer_updates(session: db_api.Session) -> list[tuple[str, str, list[str]]]:
    """(host, network id, its peers) for every host running instances of a deployment
    with a listener: what to cast set_network_peers with once the gateways changed."""
    updates = []
    for deployment in db_api.listener_deployments(session):
        network = db_api.network_of(session, deployment.id)
        if network is not None:
            updates.extend((host, network.id, peers(session, deployment.id, host))
                           for host in running_hosts(session, deployment.id))
    return updates


def build_keys(session: db_api.Session, instance: models.Instance) -> dict:
    """What a build request of ``instance`` on its host carries of its network. A
    deployment of before networks has none: every value is None (no NIC).

    :raises: AddressPoolExhausted if the host has no DHCP port yet and the subnet no
        address left for one.
    """
    network = db_api.network_of(session, instance.deployment_id)
    port = db_api.port_of_instance(session, instance.id)
    if network is None or port is None:
        return {'network': None, 'dhcp_port': None, 'peers': [], 'port': None}
    dhcp = dhcp_port(session, network, instance.host)
    return {'network': show(network), 'dhcp_port': _address(dhcp),
            'peers': peers(session, instance.deployment_id, instance.host),
            'port': _address(port)}


def peer_updates(session: db_api.Session, deployment_id: str,
                 moved_to: str) -> list[tuple[str, str, list[str]]]:
    """After an instance of the deployment moved to ``moved_to``: (host, network id, its
    peers) for every other host running instances of it, to cast set_network_peers."""
    network = db_api.network_of(session, deployment_id)
    if network is None:
        return []
    return [(host, network.id, peers(session, deployment_id, host))
            for host in running_hosts(session, deployment_id) if host != moved_to]


def release_port(session: db_api.Session, instance: models.Instance) -> None:
    """``instance`` is deleted (its host confirmed the guest gone, or it never had one):
    its address and MAC are free; its network too if its deployment is deleted and it
    was the last instance port."""
    port = db_api.port_of_instance(session, instance.id)
    if port is not None:
        db_api.port_delete(session, port)
    release_network(session, instance.deployment_id)


def release_network(session: db_api.Session, deployment_id: str) -> None:
    """Once the deployment is deleted, its network is deleting, and goes with its DHCP
    ports when no instance port is left."""
    network = db_api.network_of(session, deployment_id)
    deployment = db_api.deployment_get(session, deployment_id)
    if network is None or deployment.state != states.DELETED:
        return
    network.state = states.DELETING
    if not db_api.instance_port_count(session, network.id):
        db_api.network_delete(session, network)


def show(network: models.Network) -> dict:
    return {'id': network.id, 'vni': network.vni, 'cidr': network.cidr}


def _address(port: models.Port) -> dict:
    return {'mac': port.mac, 'address': port.address}


def adoption_keys(session: db_api.Session, instance: models.Instance) -> dict:
    """What a registering host learns of an instance's network: {'network': {'id',
    'vni', 'cidr'} | None, 'port': {'mac', 'address'} | None, 'peers': [VTEP address of
    every other host running the deployment]}: the peers as they are now, so a host
    that missed a set_network_peers cast (down, restarted) is put right as it starts."""
    network = db_api.network_of(session, instance.deployment_id)
    port = db_api.port_of_instance(session, instance.id)
    return {'network': show(network) if network is not None else None,
            'port': _address(port) if port is not None else None,
            'peers': (peers(session, instance.deployment_id, instance.host)
                      if network is not None else [])}


def ports_by_instance(session: db_api.Session, deployment_id: str) -> dict[str, models.Port]:
    """{instance id: its port} of the deployment's instances that hold one."""
    network = db_api.network_of(session, deployment_id)
    if network is None:
        return {}
    return {p.instance_id: p for p in db_api.ports_of(session, network.id)
            if p.kind == INSTANCE}
