"""The monitoring page, and the figures static/monitoring.js polls to keep it live:
monitoring.json (every 500 ms) and history.json (for the charts)."""
import logging

import fastapi
from fastapi import responses

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api.dashboard import pages
from vmcloud.api.dashboard import session

LOG = logging.getLogger(__name__)

router = pages.router()
Services = context.Services
User = auth.User
services_of = fastapi.Depends(context.services)
user_of = fastapi.Depends(session.current_user)
EVENTS_SHOWN = 20


def connections(services: Services) -> list[dict]:
    """The gateway's connections, [] if it cannot say (the live figures' 'gateway' says
    why: the page shows that rather than failing)."""
    try:
        return services.monitor.connections()
    except exception.VmcloudError as exc:
        LOG.debug('no connections to show: %s', exc)
        return []


def live(services: Services) -> dict:
    """Monitor.live() and the connections (each with its duration_seconds)."""
    return dict(services.monitor.live(), connections=connections(services))


def events(services: Services) -> list[dict]:
    try:
        return services.monitor.events(EVENTS_SHOWN)
    except exception.VmcloudError as exc:
        LOG.debug('no events to show: %s', exc)
        return []


@router.get('/monitoring')
def monitoring_page(request: fastapi.Request, user: User = user_of,
                    services: Services = services_of):
    return pages.render(request, 'monitoring.html', live=live(services),
                        events=events(services))


@router.get('/monitoring.json')
def monitoring_json(user: User = user_of, services: Services = services_of):
    return responses.JSONResponse(live(services))


@router.get('/history.json')
def history_json(user: User = user_of, services: Services = services_of):
    return responses.JSONResponse(services.monitor.history())
