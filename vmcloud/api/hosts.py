"""``/v1/hosts``: the compute hosts the dispatcher knows (they register themselves), and
fencing one the operator knows is dead (admins). Clouds take hosts through
``PUT /v1/clouds/{name}/hosts/{host}``."""
import fastapi
import pydantic

from vmcloud import exception
from vmcloud.api import applications
from vmcloud.api import auth
from vmcloud.api import clouds
from vmcloud.api import context
from vmcloud.api import pagination

router = fastapi.APIRouter(prefix='/v1/hosts', tags=['hosts'],
                           dependencies=[fastapi.Depends(auth.current_user)])
services_of = fastapi.Depends(context.services)
page_of = fastapi.Depends(pagination.params)


class Host(applications.Shown):
    name: str
    state: str = pydantic.Field(description='up, unknown (silent) or fenced')
    vcpus: int | None = None
    memory_mib: int | None = None
    instances: int | None = pydantic.Field(None, description='Instances that may have a '
                                                             'guest there')
    vcpus_used: int | None = None
    memory_mib_used: int | None = None
    peer_url: str | None = pydantic.Field(None, description='Where other compute hosts ask '
                                                            'it for chunks (empty: no peer '
                                                            'exchange)')


class HostBody(pydantic.BaseModel):
    host: Host


class HostList(pydantic.BaseModel):
    hosts: list[Host]
    hosts_links: list[applications.Link]


class Fence(applications.Shown):
    host: str
    state: str
    rebuilt: list[str] = pydantic.Field([], description='Instances rebuilt elsewhere')
    failed: list[str] = pydantic.Field([], description='Instances that could not be')


class FenceBody(pydantic.BaseModel):
    fence: Fence


@router.get('', response_model=HostList, response_model_exclude_unset=True)
def list_hosts(request: fastapi.Request, page: pagination.Page = page_of,
               services: context.Services = services_of) -> dict:
    """Hosts by name."""
    rows = services.dispatcher.list_hosts(limit=page.rows_wanted, marker=page.marker)
    return pagination.listed(request, 'hosts', rows, page, 'name')


@router.get('/{name}', response_model=HostBody, response_model_exclude_unset=True)
def show_host(name: str = clouds.host_path(), services: context.Services = services_of) -> dict:
    """:raises: HostNotFound (404)."""
    # The dispatcher shows hosts only as a list; a cloud has a few dozen.
    for host in services.dispatcher.list_hosts():
        if host['name'] == name:
            return {'host': host}
    raise exception.HostNotFound(name)


@router.post('/{name}/fence', dependencies=[fastapi.Depends(auth.require_admin)],
             response_model=FenceBody, response_model_exclude_unset=True)
def fence_host(name: str = clouds.host_path(), services: context.Services = services_of) -> dict:
    """The operator says the host is dead: its instances are rebuilt elsewhere (or end in
    error), and it takes no new ones until it registers again.

    :raises: HostNotFound (404).
    """
    return {'fence': services.dispatcher.fence_host(name)}
