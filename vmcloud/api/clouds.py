"""``/v1/clouds``: groups of compute hosts with a connection limit their deployments'
listeners share on the gateway. Reads for every user; changes for admins."""
import urllib.parse

import fastapi
import pydantic

from vmcloud.api import applications
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import pagination

router = fastapi.APIRouter(prefix='/v1/clouds', tags=['clouds'],
                           dependencies=[fastapi.Depends(auth.current_user)])
admin_only = [fastapi.Depends(auth.require_admin)]
services_of = fastapi.Depends(context.services)
page_of = fastapi.Depends(pagination.params)

# vmcloud.dispatcher.clouds.CLOUD_NAME, checked there again.
CLOUD_NAME = r'^[a-z0-9-]{1,32}$'
# A host's name is its [DEFAULT] host (the hosts table holds 255 characters).
MAX_HOST_NAME = 255
MAX_HOSTS = 1000

CloudName = pydantic.constr(pattern=CLOUD_NAME)
HostName = pydantic.constr(min_length=1, max_length=MAX_HOST_NAME)


def host_path():
    """A path parameter naming a compute host (a new one for each route: FastAPI names
    the parameter in it)."""
    return fastapi.Path(min_length=1, max_length=MAX_HOST_NAME,
                        description='A compute host\'s name')


class CloudCreate(applications.Body):
    name: CloudName = pydantic.Field(description='1 to 32 of a-z 0-9 -')
    connection_limit: applications.ConnectionLimit = pydantic.Field(
        description='At most this many connections at once to its deployments\' '
                    'listeners')
    hosts: list[HostName] = pydantic.Field(
        [], max_length=MAX_HOSTS,
        description='The compute hosts its instances go on (none: every host)')


class CloudUpdate(applications.Body):
    connection_limit: applications.ConnectionLimit | None = pydantic.Field(
        None, description='Holds at once on the gateway')


class Cloud(applications.Shown):
    name: str
    connection_limit: int
    created_at: str | None = None
    hosts: list[str] = pydantic.Field([], description='Its hosts (none: every host)')
    deployments: list[str] = pydantic.Field(
        [], description='The ids of its deployments that are not deleted')


class CloudBody(pydantic.BaseModel):
    cloud: Cloud


class CloudList(pydantic.BaseModel):
    clouds: list[Cloud]
    clouds_links: list[applications.Link]


def _location(name: str) -> str:
    return f'{router.prefix}/{urllib.parse.quote(name, safe="")}'


def create(services: context.Services, body: CloudCreate) -> dict:
    """Create the cloud ``body`` describes (the caller checked the user is an admin).

    :raises: NameInUse (409), HostNotFound (404).
    """
    return services.dispatcher.create_cloud(body.name, body.connection_limit, body.hosts)


@router.get('', response_model=CloudList, response_model_exclude_unset=True)
def list_clouds(request: fastapi.Request, page: pagination.Page = page_of,
                services: context.Services = services_of) -> dict:
    """Clouds by name."""
    rows = services.dispatcher.list_clouds(limit=page.rows_wanted, marker=page.marker)
    return pagination.listed(request, 'clouds', rows, page, 'name')


@router.post('', status_code=201, dependencies=admin_only, response_model=CloudBody,
             response_model_exclude_unset=True)
def create_cloud(body: CloudCreate, response: fastapi.Response,
                 services: context.Services = services_of) -> dict:
    """:raises: NameInUse (409), HostNotFound (404)."""
    cloud = create(services, body)
    response.headers['Location'] = _location(cloud['name'])
    return {'cloud': cloud}


@router.get('/{name}', response_model=CloudBody, response_model_exclude_unset=True)
def show_cloud(name: str, services: context.Services = services_of) -> dict:
    return {'cloud': services.dispatcher.show_cloud(name)}


@router.patch('/{name}', dependencies=admin_only, response_model=CloudBody,
              response_model_exclude_unset=True)
def update_cloud(name: str, body: CloudUpdate,
                 services: context.Services = services_of) -> dict:
    # No limit given changes nothing: update_cloud then only shows the cloud.
    return {'cloud': services.dispatcher.update_cloud(
        name, connection_limit=body.connection_limit)}


@router.delete('/{name}', status_code=204, dependencies=admin_only,
               response_class=fastapi.Response)
def delete_cloud(name: str, services: context.Services = services_of):
    """:raises: InUse (409) for the default cloud, or while a deployment in it is not
    deleted."""
    services.dispatcher.delete_cloud(name)
    return fastapi.Response(status_code=204)


@router.put('/{name}/hosts/{host}', dependencies=admin_only, response_model=CloudBody,
            response_model_exclude_unset=True)
def assign_host(name: str, host: str = host_path(),
                services: context.Services = services_of) -> dict:
    """The cloud's instances placed from now on may go on ``host`` (those placed stay).

    :raises: CloudNotFound, HostNotFound (404).
    """
    return {'cloud': services.dispatcher.update_cloud(name, add_hosts=[host])}


@router.delete('/{name}/hosts/{host}', status_code=204, dependencies=admin_only,
               response_class=fastapi.Response)
def unassign_host(name: str, host: str = host_path(),
                  services: context.Services = services_of):
    """The cloud's instances placed from now on no longer go on ``host`` (a host not
    in it: nothing to do).

    :raises: CloudNotFound (404); InUse (409) for its last host: a cloud that lists no
        host places on every host.
    """
    services.dispatcher.update_cloud(name, remove_hosts=[host])
    return fastapi.Response(status_code=204)
