"""What every request of the API reaches: the services (``Services``), and the request's
id (``request_id``).

The request id is made current for the whole request, in the event loop and in the
threads its dependencies and endpoint run in, with ``vmcloud.rpc.request_context``
(which keeps it per asyncio task: see vmcloud.rpc's request ids), as everywhere in
vmcloud: oslo.log's formatter shows it on each line and each RPC message carries it to
the dispatcher.
"""
import dataclasses
from typing import TYPE_CHECKING, Callable

import fastapi
from oslo_config import cfg

from vmcloud.dispatcher import rpcapi
from vmcloud.storage import warehouse as warehouse_mod

if TYPE_CHECKING:  # the Identity and the Monitor import this module
    from vmcloud.api import auth
    from vmcloud.api import monitor as monitor_mod


@dataclasses.dataclass
class Services:
    """What the endpoints work with: made once per process (``app.build_services``) or
    by a test."""
    conf: cfg.ConfigOpts
    # Or anything with its methods (tests).
    dispatcher: rpcapi.DispatcherAPI
    identity: 'auth.Identity'
    # A Warehouse for the request (the same one each time, made at the first call).
    warehouse: Callable[[], warehouse_mod.Warehouse]
    monitor: 'monitor_mod.Monitor'


def services(request: fastapi.Request) -> Services:
    """FastAPI dependency: the app's services (``app.state.services``)."""
    return request.app.state.services


def request_id(request: fastapi.Request) -> str:
    """The id of ``request`` (the X-OpenStack-Request-ID of its answer), '' outside the
    API's middleware (which sets it before anything else runs)."""
    return getattr(request.state, 'request_id', '')
