"""The deployments' pages: list, deploy an application into a cloud, show (refreshed by
static/deployment.js while it builds), delete. Members deploy and delete their own, by
the API's rules (vmcloud.api.deployments)."""
import urllib.parse

import fastapi
from fastapi import responses
from starlette import datastructures

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import deployments as api_deployments
from vmcloud.api import pagination
from vmcloud.api.dashboard import csrf
from vmcloud.api.dashboard import forms
from vmcloud.api.dashboard import pages
from vmcloud.api.dashboard import session
from vmcloud.dispatcher import states

router = pages.router('/deployments')
FIELDS = ('application', 'cloud', 'count', 'min_count')
# The building deployments of a list's page whose progress it shows: one look at each
# (a list's rows come without their instances).
PROGRESS_SHOWN = 20
Services = context.Services
User = auth.User
services_of = fastapi.Depends(context.services)
user_of = fastapi.Depends(session.current_user)
form_of = fastapi.Depends(csrf.checked_form)


def _url(deployment_id: str, tail: str = '') -> str:
    return f'/dashboard/deployments/{urllib.parse.quote(deployment_id, safe="")}{tail}'


def can_delete(user: User, deployment: dict) -> bool:
    """Whether ``user`` may delete ``deployment`` (and it is not deleted already)."""
    if deployment.get('state') in (states.DELETED, states.DELETING):
        return False
    try:
        api_deployments.check_can_delete(user, deployment)
    except exception.Forbidden:
        return False
    return True


@router.get('')
def list_deployments(request: fastapi.Request, marker: str | None = None,
                     cloud: str | None = None, deleted: str | None = None,
                     user: User = user_of, services: Services = services_of):
    page = pages.page(services, marker)
    rows, next_marker = pagination.split(
        services.dispatcher.list_deployments(limit=page.rows_wanted, marker=page.marker,
                                             cloud=cloud or None),
        page, 'id')
    rows = _progress_of_building(services, rows)
    next_query = None
    if next_marker is not None:
        next_query = urllib.parse.urlencode(
            {'marker': next_marker} | ({'cloud': cloud} if cloud else {}))
    return pages.render(request, 'deployments.html', deployments=rows,
                        deletable={d['id'] for d in rows if can_delete(user, d)},
                        next_query=next_query, cloud=cloud, deleted=pages.named(deleted))


def _progress_of_building(services: Services, rows: list[dict]) -> list[dict]:
    """The rows, the first PROGRESS_SHOWN building ones with their progress (the others'
    state says enough)."""
    shown = []
    looks = 0
    for row in rows:
        if row.get('state') == states.BUILDING and looks < PROGRESS_SHOWN:
            looks += 1
            try:
                row = api_deployments.with_progress(services.dispatcher.show_deployment(
                    row['id']))
            except exception.DeploymentNotFound:
                pass  # deleted since the list was read: shown as it was listed
        shown.append(row)
    return shown


def _form(request: fastapi.Request, services: Services, values: dict,
          error: str | None = None, status: int = 200) -> fastapi.Response:
    return pages.render(request, 'deployment_form.html', status=status, values=values,
                        applications=[a['name'] for a in
                                      services.dispatcher.list_applications()],
                        clouds=[c['name'] for c in services.dispatcher.list_clouds()],
                        error=error)


@router.get('/new')
def new_deployment(request: fastapi.Request, application: str | None = None,
                   cloud: str | None = None, user: User = user_of,
                   services: Services = services_of):
    values = {'application': application or '',
              'cloud': cloud or api_deployments.DEFAULT_CLOUD, 'count': '1', 'min_count': ''}
    return _form(request, services, values)


@router.post('')
def create_deployment(request: fastapi.Request, user: User = user_of,
                      form: datastructures.FormData = form_of,
                      services: Services = services_of):
    request_body = {'application': forms.text(form, 'application'),
                    'cloud': forms.text(form, 'cloud') or api_deployments.DEFAULT_CLOUD}
    try:
        request_body['count'] = forms.whole_number(form, 'count', 'count')
        min_count = forms.whole_number(form, 'min_count', 'at least', required=False)
        if min_count is not None:
            request_body['min_count'] = min_count
        body = pages.validated(api_deployments.DeploymentCreate, request_body)
        deployment = api_deployments.create(services, user, body)
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _form(request, services, forms.values(form, FIELDS), error=message,
                     status=status)
    return pages.redirect(_url(deployment['id']))


@router.get('/{deployment_id}')
def show_deployment(request: fastapi.Request, deployment_id: str, user: User = user_of,
                    services: Services = services_of):
    return _show(request, services, user, deployment_id)


def _show(request: fastapi.Request, services: Services, user: User, deployment_id: str,
          error: str | None = None, status: int = 200) -> fastapi.Response:
    deployment = api_deployments.with_progress(
        services.dispatcher.show_deployment(deployment_id))
    return pages.render(request, 'deployment.html', status=status, deployment=deployment,
                        deletable=can_delete(user, deployment),
                        building=deployment['state'] == states.BUILDING, error=error)


@router.get('/{deployment_id}/progress.json')
def deployment_progress(deployment_id: str, user: User = user_of,
                        services: Services = services_of):
    """What deployment.js shows of a building deployment: its state, progress and
    instances."""
    deployment = api_deployments.with_progress(
        services.dispatcher.show_deployment(deployment_id))
    return responses.JSONResponse({
        'state': deployment['state'], 'reason': deployment.get('reason') or '',
        'progress': deployment['progress'],
        'instances': [{'name': i['name'], 'state': i['state'], 'host': i.get('host'),
                       'address': i.get('address'), 'reason': i.get('reason') or ''}
                      for i in deployment.get('instances', [])]})


@router.post('/{deployment_id}/delete')
def delete_deployment(request: fastapi.Request, deployment_id: str, user: User = user_of,
                      form: datastructures.FormData = form_of,
                      services: Services = services_of):
    deployment = services.dispatcher.show_deployment(deployment_id)
    api_deployments.check_can_delete(user, deployment)
    try:
        services.dispatcher.delete_deployment(deployment_id)
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _show(request, services, user, deployment_id, error=message, status=status)
    return pages.redirect('/dashboard/deployments?'
                          + urllib.parse.urlencode({'deleted': deployment_id}))
