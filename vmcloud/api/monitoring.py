"""``/v1/monitoring``: the live figures of each cloud, the gateway's connections, the
recent events and the history of the figures (vmcloud.api.monitor). Every user reads
them."""
from typing import Any

import fastapi
import pydantic

from vmcloud.api import auth
from vmcloud.api import clouds
from vmcloud.api import context

router = fastapi.APIRouter(prefix='/v1/monitoring', tags=['monitoring'],
                           dependencies=[fastapi.Depends(auth.current_user)])
services_of = fastapi.Depends(context.services)
# The dispatcher keeps [DEFAULT] event_history events (500 by default).
MAX_EVENTS = 1000


class CloudFigures(pydantic.BaseModel):
    name: str
    connection_limit: int
    deployments: int = pydantic.Field(description='Its deployments not deleted')
    applications_deployed: int = pydantic.Field(
        description='Applications with a deployment in it that is not deleted')
    applications_running: int = pydantic.Field(
        description='Those with an active instance in it')
    instances_running: int = pydantic.Field(description='Its active instances')
    instances: dict[str, int] = pydantic.Field(description='Its instances by state '
                                                           '(deleted ones left out)')
    users: int | None = pydantic.Field(description='Distinct client addresses connected '
                                                   'now (null: the gateway does not '
                                                   'answer)')
    connections: int | None = pydantic.Field(description='Connections open now')
    available: int | None = pydantic.Field(description='connection_limit - connections, '
                                                       'never below 0')
    hosts_up: int | None
    hosts_total: int | None


class Live(pydantic.BaseModel):
    sampled_at: str
    clouds: list[CloudFigures]
    instances: dict[str, int] = pydantic.Field(description='Every instance by state')
    deployments: dict[str, int] = pydantic.Field(description='Every deployment by state')
    gateway: str = pydantic.Field(description="'ok', or 'unavailable: ' and why")


class Connection(pydantic.BaseModel):
    client: str
    client_port: int
    cloud: str
    application: str | None
    deployment: str
    instance: str | None = pydantic.Field(description='Its instance\'s id (null before '
                                                      'an HTTP connection\'s first answer)')
    instance_name: str | None = pydantic.Field(
        None, description='Its instance\'s name (null when unknown: no instance yet, or '
                          'one deleted that still holds the connection)')
    listener_port: int
    started_at: str | None
    duration_seconds: float | None


class Connections(pydantic.BaseModel):
    connections: list[Connection]


class Event(pydantic.BaseModel):
    at: str
    event: str
    payload: dict[str, Any]


class Events(pydantic.BaseModel):
    events: list[Event]


class Sample(pydantic.BaseModel):
    at: str
    clouds: dict[str, dict[str, int | None]] = pydantic.Field(
        description='name: {connections, instances_running, users}')


class History(pydantic.BaseModel):
    interval: float = pydantic.Field(description='Seconds between samples')
    samples: list[Sample] = pydantic.Field(description='Oldest first')


@router.get('', response_model=Live)
def live(services: context.Services = services_of) -> dict:
    """Each cloud's figures now (at most [api] live_max_age old). Without a gateway
    answering, users, connections and available are null and 'gateway' says why."""
    return services.monitor.live()


@router.get('/connections', response_model=Connections)
def connections(cloud: str | None = fastapi.Query(None, pattern=clouds.CLOUD_NAME),
                services: context.Services = services_of) -> dict:
    """The connections the gateway holds now (of ``cloud`` if given).

    :raises: CloudNotFound (404); GatewayUnavailable (503).
    """
    return {'connections': services.monitor.connections(cloud)}


@router.get('/events', response_model=Events)
def events(limit: int = fastapi.Query(50, ge=1, le=MAX_EVENTS),
           services: context.Services = services_of) -> dict:
    """What the dispatcher did of late, newest first."""
    return {'events': services.monitor.events(limit)}


@router.get('/history', response_model=History)
def history(services: context.Services = services_of) -> dict:
    """The figures sampled every [api] monitor_interval s (the last [api]
    history_length samples)."""
    return services.monitor.history()
