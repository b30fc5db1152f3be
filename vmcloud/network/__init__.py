"""Guest networks: the per-host network agent (bridges, VXLAN, DHCP), the health probes
that reach guests from the host's side, and address management (ipam)."""
from vmcloud import exception
from vmcloud.network import agent
from vmcloud.network import fake


def load_agent(conf, drivers=()):
    """The network agent ``[network] agent`` names: the Linux one, or the fake one
    modelling the networks on ``drivers`` (the machine's fake or sim drivers; the Linux
    agent needs none).

    :raises: NetworkError for an unknown agent.
    """
    kind = conf.network.agent
    if kind == 'linux':
        return agent.NetworkAgent(conf)
    if kind == 'fake':
        return fake.FakeNetworkAgent(conf, drivers)
    raise exception.NetworkError(f'no network agent {kind!r} (linux or fake)')
