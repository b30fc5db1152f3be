"""What every dashboard page shares: the templates, the layout's context, and the route
class that answers the errors of any page as a page (the login for no session, a 403
page for a refused form, the problem of the dispatcher with its status)."""
import datetime
import json
import logging
import os
import re
from typing import Any, Callable, Coroutine, TypeVar

import fastapi
import jinja2
import pydantic
from fastapi import responses
from fastapi import routing

from vmcloud import exception
from vmcloud.api import context
from vmcloud.api import errors
from vmcloud.api import pagination
from vmcloud.api.dashboard import csrf
from vmcloud.api.dashboard import session

LOG = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, 'static')
STATIC_URL = '/dashboard/static'
# What a page may echo of its query after a deletion: a name or id, nothing to read as
# a message of the dashboard's.
_NAME_OR_ID = re.compile(r'[a-z0-9-]{1,64}\Z')
M = TypeVar('M', bound=pydantic.BaseModel)


def duration(seconds: float | int | None) -> str:
    """'1 h 02 min', '3 min 05 s', '12 s': a connection's age, read at a glance."""
    if seconds is None:
        return '–'
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f'{hours} h {minutes:02d} min'
    if minutes:
        return f'{minutes} min {secs:02d} s'
    return f'{secs} s'


def moment(value: str | None) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM:SS' (UTC: the dispatcher's clock)."""
    if not value:
        return '–'
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return str(value)
    return parsed.strftime('%Y-%m-%d %H:%M:%S')


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(HERE, 'templates')),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters['duration'] = duration
    env.filters['moment'] = moment
    # Compact JSON of a payload, for a table cell (escaped as any text).
    env.filters['compact'] = lambda value: json.dumps(value, sort_keys=True,
                                                      separators=(',', ':'))
    env.globals['static'] = lambda name: f'{STATIC_URL}/{name}'
    return env


TEMPLATES = _environment()


def render(request: fastapi.Request, template: str, status: int = 200,
           headers: dict | None = None, **values: Any) -> responses.HTMLResponse:
    """``template`` with the layout's values: the user (None on the login page), the CSRF
    token for its forms, the path (to mark the current section)."""
    page = TEMPLATES.get_template(template).render(
        user=getattr(request.state, 'user', None), csrf_token=csrf.token(request),
        path=request.url.path, **values)
    return responses.HTMLResponse(page, status_code=status, headers=headers)


def problem(request: fastapi.Request, status: int, message: str) -> responses.HTMLResponse:
    """A page saying what went wrong, with the status of the problem."""
    titles = {400: 'Bad request', 403: 'Not allowed', 404: 'Not found', 409: 'Conflict',
              422: 'Not valid', 429: 'Too many attempts', 503: 'Service unavailable'}
    return render(request, 'problem.html', status=status, message=message,
                  title=titles.get(status, 'Something went wrong'))


def redirect(url: str) -> responses.RedirectResponse:
    """303: the browser GETs ``url`` (after a form, the page that shows its outcome)."""
    return responses.RedirectResponse(url, status_code=303)


def _json_error(request: fastapi.Request, status: int, message: str,
                error: exception.VmcloudError | None = None) -> fastapi.Response:
    """The API's error body, for the scripts polling the .json resources."""
    return errors.response(context.request_id(request), status, message, error=error)


def _answer(request: fastapi.Request, error: exception.VmcloudError) -> fastapi.Response:
    """The page (or JSON, for a script) of an error no endpoint answered itself."""
    if isinstance(error, exception.Unauthorized):
        if request.url.path.endswith('.json'):
            # A script polling: it cannot follow a login page.
            return _json_error(request, 401, str(error), error)
        if request.method != 'GET':
            return redirect(session.LOGIN)
        return redirect(session.login_url(request))
    status = errors.status_of(error)
    if status >= 500:
        LOG.error('dashboard %s %s: %s', request.method, request.url.path, error)
    if request.url.path.endswith('.json'):
        return _json_error(request, status, str(error), error)
    return problem(request, status, str(error))


class DashboardRoute(routing.APIRoute):
    """A dashboard route: the errors its endpoint or dependencies raise are pages, and a
    browser without a CSRF cookie gets one with its page."""

    def get_route_handler(self) -> Callable[[fastapi.Request],
                                            Coroutine[Any, Any, fastapi.Response]]:
        endpoint = super().get_route_handler()

        async def handler(request: fastapi.Request) -> fastapi.Response:
            try:
                response = await endpoint(request)
            except exception.VmcloudError as exc:
                response = _answer(request, exc)
            csrf.set_cookie(request, response, request.app.state.services.conf.api.secure_cookies)
            return response

        return handler


def router(prefix: str = '') -> fastapi.APIRouter:
    """A router of dashboard pages (included by views.router under /dashboard)."""
    return fastapi.APIRouter(prefix=prefix, include_in_schema=False,
                             route_class=DashboardRoute)


def page(services: context.Services, marker: str | None) -> pagination.Page:
    """The page of a list a dashboard page shows: ``[api] page_size`` rows after
    ``marker`` (an empty one: the first page)."""
    return pagination.Page(limit=services.conf.api.page_size, marker=marker or None)


def validated(model: type[M], data: dict) -> M:
    """``data`` read by the API's request ``model``: a form is held to the rules of
    /v1's bodies, and its problems said in the same words.

    :raises: InvalidRequest naming each field that does not validate.
    """
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise exception.InvalidRequest(errors.validation_message(exc.errors())) from exc


def form_error(error: exception.VmcloudError) -> tuple[int, str]:
    """A form's problem as the page shows it: (status, message). A refusal of the
    session or the role is no problem of the form: it propagates.

    :raises: Unauthorized, Forbidden.
    """
    if isinstance(error, (exception.Unauthorized, exception.Forbidden)):
        raise error
    return errors.status_of(error), str(error)


def named(value: str | None) -> str | None:
    """``value`` if it is a name or id the dashboard may echo, else None."""
    return value if value and _NAME_OR_ID.match(value) else None
