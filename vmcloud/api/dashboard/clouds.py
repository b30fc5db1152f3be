"""The clouds' pages: list, add, show (with its hosts assigned and unassigned), edit,
delete. Changing anything is for admins."""
import urllib.parse

import fastapi
from starlette import datastructures

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.api import clouds as api_clouds
from vmcloud.api import context
from vmcloud.api import pagination
from vmcloud.api.dashboard import csrf
from vmcloud.api.dashboard import forms
from vmcloud.api.dashboard import pages
from vmcloud.api.dashboard import session

router = pages.router('/clouds')
FIELDS = ('name', 'connection_limit')
Services = context.Services
User = auth.User
services_of = fastapi.Depends(context.services)
user_of = fastapi.Depends(session.current_user)
form_of = fastapi.Depends(csrf.checked_form)


def _url(name: str, tail: str = '') -> str:
    return f'/dashboard/clouds/{urllib.parse.quote(name, safe="")}{tail}'


def _host_names(services: Services) -> list[str]:
    return sorted(h['name'] for h in services.dispatcher.list_hosts())


@router.get('')
def list_clouds(request: fastapi.Request, marker: str | None = None,
                deleted: str | None = None, user: User = user_of,
                services: Services = services_of):
    page = pages.page(services, marker)
    rows, next_marker = pagination.split(
        services.dispatcher.list_clouds(limit=page.rows_wanted, marker=page.marker), page,
        'name')
    return pages.render(request, 'clouds.html', clouds=rows, next_marker=next_marker,
                        deleted=pages.named(deleted))


def _form(request: fastapi.Request, services: Services, values: dict, selected: list[str],
          editing: dict | None = None, error: str | None = None,
          status: int = 200) -> fastapi.Response:
    return pages.render(request, 'cloud_form.html', status=status, values=values,
                        hosts=_host_names(services), selected=selected, cloud=editing,
                        error=error)


@router.get('/new')
def new_cloud(request: fastapi.Request, user: User = user_of,
              services: Services = services_of):
    auth.check_admin(user)
    return _form(request, services, {'name': '', 'connection_limit': ''}, [])


@router.post('')
def create_cloud(request: fastapi.Request, user: User = user_of,
                 form: datastructures.FormData = form_of, services: Services = services_of):
    auth.check_admin(user)
    hosts = [h for h in form.getlist('hosts') if isinstance(h, str) and h]
    name = forms.text(form, 'name')
    try:
        body = pages.validated(api_clouds.CloudCreate, {
            'name': name, 'hosts': hosts,
            'connection_limit': forms.whole_number(form, 'connection_limit',
                                                   'connection limit')})
        api_clouds.create(services, body)
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _form(request, services, forms.values(form, FIELDS), hosts, error=message,
                     status=status)
    return pages.redirect(_url(name))


@router.get('/{name}')
def show_cloud(request: fastapi.Request, name: str, user: User = user_of,
               services: Services = services_of):
    return _show(request, services, name)


def _show(request: fastapi.Request, services: Services, name: str, error: str | None = None,
          status: int = 200) -> fastapi.Response:
    cloud = services.dispatcher.show_cloud(name)
    others = [h for h in _host_names(services) if h not in cloud['hosts']]
    return pages.render(request, 'cloud.html', status=status, cloud=cloud,
                        unassigned=others, error=error)


@router.get('/{name}/edit')
def edit_cloud(request: fastapi.Request, name: str, user: User = user_of,
               services: Services = services_of):
    auth.check_admin(user)
    cloud = services.dispatcher.show_cloud(name)
    values = {'name': cloud['name'], 'connection_limit': str(cloud['connection_limit'])}
    return _form(request, services, values, cloud['hosts'], editing=cloud)


@router.post('/{name}/edit')
def update_cloud(request: fastapi.Request, name: str, user: User = user_of,
                 form: datastructures.FormData = form_of, services: Services = services_of):
    auth.check_admin(user)
    cloud = services.dispatcher.show_cloud(name)
    wanted = sorted({h for h in form.getlist('hosts') if isinstance(h, str) and h})
    try:
        body = pages.validated(api_clouds.CloudUpdate, {
            'connection_limit': forms.whole_number(form, 'connection_limit',
                                                   'connection limit')})
        services.dispatcher.update_cloud(
            name, connection_limit=body.connection_limit,
            add_hosts=[h for h in wanted if h not in cloud['hosts']],
            remove_hosts=[h for h in cloud['hosts'] if h not in wanted])
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        values = {'name': name, 'connection_limit': forms.text(form, 'connection_limit')}
        return _form(request, services, values, wanted, editing=cloud, error=message,
                     status=status)
    return pages.redirect(_url(name))


@router.post('/{name}/delete')
def delete_cloud(request: fastapi.Request, name: str, user: User = user_of,
                 form: datastructures.FormData = form_of, services: Services = services_of):
    auth.check_admin(user)
    try:
        services.dispatcher.delete_cloud(name)
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _show(request, services, name, error=message, status=status)
    return pages.redirect('/dashboard/clouds?' + urllib.parse.urlencode({'deleted': name}))


@router.post('/{name}/hosts')
def assign_host(request: fastapi.Request, name: str, user: User = user_of,
                form: datastructures.FormData = form_of, services: Services = services_of):
    auth.check_admin(user)
    return _change_hosts(request, name, services, add=[forms.text(form, 'host')])


@router.post('/{name}/hosts/{host}/delete')
def unassign_host(request: fastapi.Request, name: str, host: str, user: User = user_of,
                  form: datastructures.FormData = form_of, services: Services = services_of):
    auth.check_admin(user)
    return _change_hosts(request, name, services, remove=[host])


def _change_hosts(request: fastapi.Request, name: str, services: Services,
                  add: tuple[str, ...] | list[str] = (),
                  remove: tuple[str, ...] | list[str] = ()) -> fastapi.Response:
    try:
        services.dispatcher.update_cloud(name, add_hosts=[h for h in add if h],
                                         remove_hosts=list(remove))
    except exception.VmcloudError as exc:
        status, message = pages.form_error(exc)
        return _show(request, services, name, error=message, status=status)
    return pages.redirect(_url(name))
