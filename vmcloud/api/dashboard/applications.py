"""The applications' pages: list, add, show, edit (update_application), delete.
Changing anything is for admins."""
import urllib.parse

import fastapi
from starlette import datastructures

from vmcloud import exception
from vmcloud.api import applications as api_applications
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import pagination
from vmcloud.api.dashboard import csrf
from vmcloud.api.dashboard import forms
from vmcloud.api.dashboard import pages
from vmcloud.api.dashboard import session

router = pages.router('/applications')
Services = context.Services
User = auth.User
services_of = fastapi.Depends(context.services)
user_of = fastapi.Depends(session.current_user)
form_of = fastapi.Depends(csrf.checked_form)


def _url(name: str, tail: str = '') -> str:
    return f'/dashboard/applications/{urllib.parse.quote(name, safe="")}{tail}'


@router.get('')
def list_applications(request: fastapi.Request, marker: str | None = None,
                      deleted: str | None = None, user: User = user_of,
                      services: Services = services_of):
    page = pages.page(services, marker)
    rows, next_marker = pagination.split(
        services.dispatcher.list_applications(limit=page.rows_wanted, marker=page.marker),
        page, 'name')
    return pages.render(request, 'applications.html', applications=rows,
                        next_marker=next_marker, deleted=pages.named(deleted))


def _form(request: fastapi.Request, values: dict, editing: dict | None = None,
          error: str | None = None, status: int = 200) -> fastapi.Response:
    return pages.render(request, 'application_form.html', status=status, values=values,
                        application=editing, error=error, protocols=api_applications.PROTOCOLS,
                        health_kinds=forms.HEALTH_KINDS)


@router.get('/new')
def new_application(request: fastapi.Request, user: User = user_of):
    auth.check_admin(user)
    return _form(request, forms.application_defaults())


@router.post('')
def create_application(request: fastapi.Request, user: User = user_of,
                       form: datastructures.FormData = form_of,
                       services: Services = services_of):
    auth.check_admin(user)
    try:
        body = pages.validated(api_applications.ApplicationCreate,
                               {'name': forms.text(form, 'name'), **forms.application(form)})
        api_applications.create(services, body)
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _form(request, forms.values(form, forms.APPLICATION_FIELDS), error=message,
                     status=status)
    return pages.redirect(_url(body.name))


@router.get('/{name}')
def show_application(request: fastapi.Request, name: str, user: User = user_of,
                     services: Services = services_of):
    return _show(request, services, name)


def _show(request: fastapi.Request, services: Services, name: str, error: str | None = None,
          status: int = 200) -> fastapi.Response:
    application = services.dispatcher.show_application(name)
    return pages.render(request, 'application.html', status=status, application=application,
                        error=error)


@router.get('/{name}/edit')
def edit_application(request: fastapi.Request, name: str, user: User = user_of,
                     services: Services = services_of):
    auth.check_admin(user)
    application = services.dispatcher.show_application(name)
    return _form(request, forms.application_values(application), editing=application)


@router.post('/{name}/edit')
def update_application(request: fastapi.Request, name: str, user: User = user_of,
                       form: datastructures.FormData = form_of,
                       services: Services = services_of):
    auth.check_admin(user)
    application = services.dispatcher.show_application(name)
    try:
        body = pages.validated(api_applications.ApplicationUpdate, forms.application_changes(
            application, forms.application(form)))
        if body.changes():
            services.dispatcher.update_application(name, body.changes())
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        values = forms.values(form, forms.APPLICATION_FIELDS) | {'name': name}
        return _form(request, values, editing=application, error=message, status=status)
    return pages.redirect(_url(name))


@router.post('/{name}/delete')
def delete_application(request: fastapi.Request, name: str, user: User = user_of,
                       form: datastructures.FormData = form_of,
                       services: Services = services_of):
    auth.check_admin(user)
    try:
        services.dispatcher.delete_application(name)
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _show(request, services, name, error=message, status=status)
    return pages.redirect('/dashboard/applications?'
                          + urllib.parse.urlencode({'deleted': name}))
