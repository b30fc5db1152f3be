"""How the dispatcher talks to the gateways."""
from oslo_config import cfg

from vmcloud import rpc

TOPIC = 'vmcloud-gateway'
# How long the dispatcher waits for a gateway's answer to connections or stats.
ANSWER_TIMEOUT = 5.0


class _FanoutClient(rpc.Client):
    """rpc.Client with a cast every server of the topic gets (the one client of vmcloud
    that needs it)."""

    def fanout_cast(self, method: str, **kwargs) -> None:
        """:raises: MessagingError if the message cannot be sent."""
        with self._errors(method, None):
            self._client.prepare(fanout=True).cast(rpc._context(), method, **kwargs)


class GatewayAPI:
    def __init__(self, conf: cfg.ConfigOpts):
        # retry=0: the dispatcher must not hang on a bus outage for a refresh the
        # gateways' own polling makes up for, nor for a connections/stats question.
        self._client = _FanoutClient(conf, TOPIC, 'gateway', retry=0)

    def refresh(self) -> None:
        """Tell every gateway to read gateway_state now (it coalesces several).

        :raises: MessagingError if the message cannot be sent.
        """
        self._client.fanout_cast('refresh')

    def connections(self, server: str, cloud: str | None = None,
                    timeout: float | None = None) -> list[dict]:
        """The connections gateway ``server`` holds now (of ``cloud`` if given):
        [{'client', 'client_port', 'cloud', 'application', 'deployment', 'instance',
        'listener_port', 'started_at'}].

        :raises: MessagingError if it does not answer within ``timeout`` s
            ([DEFAULT] rpc_call_timeout); GatewayError.
        """
        return self._client.call('connections', server=server, timeout=timeout, cloud=cloud)

    def stats(self, server: str, cloud: str | None = None,
              timeout: float | None = None) -> dict:
        """Gateway ``server``'s counters of each cloud (of ``cloud`` only if given), each
        {'cloud', 'connection_limit', 'applications_deployed', 'applications_running',
        'users_connected', 'active_connections', 'available_connections',
        'total_connections', 'rejected_connections', 'bytes_in', 'bytes_out',
        'per_instance': {instance id: active}} (vmcloud.gateway.accounting).

        :raises: MessagingError if it does not answer within ``timeout`` s; GatewayError.
        """
        return self._client.call('stats', server=server, timeout=timeout, cloud=cloud)
