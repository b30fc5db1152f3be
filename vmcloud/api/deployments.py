"""``/v1/deployments``: deploy (an application into a cloud, an image, or a snapshot),
watch the progress, delete, snapshot.

Every user reads them all; an admin or a member deploys (the deployment's owner is the
caller) and deletes its own; only an admin deletes another's, or snapshots.
``create``, ``check_can_delete`` and ``with_progress`` are the dashboard's too, so that
it keeps the same rules.
"""
import collections
import urllib.parse
from typing import Any

import fastapi
import pydantic

from vmcloud import exception
from vmcloud.api import applications
from vmcloud.api import auth
from vmcloud.api import clouds
from vmcloud.api import context
from vmcloud.api import pagination
from vmcloud.dispatcher import states

router = fastapi.APIRouter(prefix='/v1/deployments', tags=['deployments'],
                           dependencies=[fastapi.Depends(auth.current_user)])
services_of = fastapi.Depends(context.services)
user_of = fastapi.Depends(auth.current_user)
page_of = fastapi.Depends(pagination.params)

DEFAULT_CLOUD = 'default'
MAX_COUNT = 1000
# Deployment and snapshot ids are uuids; a little room for another form of id.
MAX_ID = 64
Count = pydantic.conint(strict=True, ge=1, le=MAX_COUNT)


def id_path():
    """A path parameter holding an id (a new one for each route: FastAPI names the
    parameter in it)."""
    return fastapi.Path(min_length=1, max_length=MAX_ID)


# What each way of deploying takes (beyond the field naming it).
_FORMS = {
    'application': {'cloud', 'count', 'min_count'},
    'image': {'cloud', 'count', 'min_count', 'vcpus', 'memory_mib', 'boot', 'health',
              'port', 'protocol'},
    'snapshot': {'allow_partial', 'boot'},
}
_ARTICLES = {'application': 'an', 'image': 'an', 'snapshot': 'a'}
# The instance states a progress block counts, in the order shown.
PROGRESS_STATES = (states.BUILDING, states.ACTIVE, states.UNKNOWN, states.ERROR,
                   states.DELETING, states.DELETED)


class DeploymentCreate(applications.Body):
    """Exactly one of ``application`` (deployed into ``cloud``), ``image`` (with its
    size, boot, health check and optional service) or ``snapshot`` (one instance per
    instance snapshotted), each with its own fields only."""
    application: applications.ApplicationName | None = None
    image: applications.ImageRef | None = None
    snapshot: str | None = pydantic.Field(None, min_length=1, max_length=MAX_ID,
                                          description='The id of a finished snapshot')
    cloud: clouds.CloudName | None = pydantic.Field(
        None, description=f'Where the instances go (default: {DEFAULT_CLOUD})')
    count: Count | None = None
    min_count: Count | None = pydantic.Field(
        None, description='At least this many must be placed (default: count)')
    vcpus: applications.Vcpus | None = None
    memory_mib: applications.MemoryMib | None = None
    boot: applications.Boot | None = None
    health: applications.Health | None = None
    port: applications.Port | None = pydantic.Field(
        None, description='With protocol: the guests\' service, exposed on the gateway')
    protocol: applications.Protocol | None = None
    allow_partial: bool | None = pydantic.Field(
        None, description='Deploy what a partial snapshot stored (default: refuse)')

    @pydantic.model_validator(mode='after')
    def _one_way(self) -> 'DeploymentCreate':
        given = [f for f in _FORMS if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError('give exactly one of application, image or snapshot (got '
                             f'{", ".join(given) or "none"})')
        form = given[0]
        foreign = sorted(f for f in self.model_fields_set
                         if f not in _FORMS[form] and f != form)
        if foreign:
            raise ValueError(f'a deployment of {_ARTICLES[form]} {form} takes no '
                             f'{", ".join(foreign)}')
        if form != 'snapshot' and self.count is None:
            raise ValueError(f'a deployment of {_ARTICLES[form]} {form} needs a count')
        if self.min_count is not None and self.min_count > self.count:
            raise ValueError(f'min_count {self.min_count} is above count {self.count}')
        if (self.port is None) != (self.protocol is None):
            raise ValueError('a service needs both a port and a protocol')
        return self

    @property
    def form(self) -> str:
        """'application', 'image' or 'snapshot'."""
        return next(f for f in _FORMS if getattr(self, f) is not None)


class Progress(pydantic.BaseModel):
    """How many of its instances are in each state."""
    total: int
    building: int
    active: int
    unknown: int
    error: int
    deleting: int
    deleted: int


class Deployment(applications.Shown):
    id: str
    state: str = pydantic.Field(description='building, active, unknown, error or deleted')
    reason: str | None = None
    image: str | None = None
    count: int | None = None
    min_count: int | None = None
    cloud: str | None = None
    application: str | None = None
    owner: str | None = pydantic.Field(None, description='The API user it was deployed '
                                                         'for')
    listener_port: int | None = pydantic.Field(None, description='Its port on the gateway')
    created_at: str | None = None
    instances: list[dict[str, Any]] | None = None
    progress: Progress | None = None


class DeploymentBody(pydantic.BaseModel):
    deployment: Deployment


class DeploymentList(pydantic.BaseModel):
    deployments: list[Deployment]
    deployments_links: list[applications.Link]


class Snapshot(applications.Shown):
    id: str
    deployment_id: str
    state: str = pydantic.Field(description='freezing, uploading, available, partial or '
                                            'error')
    reason: str | None = None
    created_at: str | None = None
    replicated: bool | None = pydantic.Field(
        None, description='Deployable: every instance it stored is on its owners among the '
                          'compute nodes or in the repository')
    persistent: bool | None = pydantic.Field(
        None, description='Every chunk of every instance it stored is in the repository')


class SnapshotBody(pydantic.BaseModel):
    snapshot: Snapshot


def quoted(text: str) -> str:
    return urllib.parse.quote(text, safe='')


def with_progress(deployment: dict) -> dict:
    """``deployment`` (as show_deployment answers it, with its instances) and its
    'progress': {'total', and the count of each of PROGRESS_STATES}. A deployment
    shown without instances (a list's row) counts none."""
    counts = collections.Counter(i['state'] for i in deployment.get('instances') or ())
    progress = {'total': sum(counts.values())}
    progress.update((state, counts.get(state, 0)) for state in PROGRESS_STATES)
    return dict(deployment, progress=progress)


def create(services: context.Services, user: auth.User, body: DeploymentCreate) -> dict:
    """Deploy as ``body`` says, for ``user`` (its owner).

    :raises: what the dispatcher's deploy raises: ApplicationNotFound, CloudNotFound,
        ImageNotFound, SnapshotNotFound (404), NoValidHost, AddressPoolExhausted,
        ListenerPortsExhausted (409), InvalidRequest (422), MessagingError (503).
    """
    if not user.is_admin:
        _check_member_may(body)
    dispatcher = services.dispatcher
    cloud = body.cloud or DEFAULT_CLOUD
    if body.form == 'application':
        return dispatcher.deploy_application(body.application, cloud, body.count,
                                             min_count=body.min_count, owner=user.name)
    if body.form == 'snapshot':
        return dispatcher.deploy_snapshot(body.snapshot,
                                          boot=body.boot.as_request() if body.boot else None,
                                          allow_partial=bool(body.allow_partial),
                                          owner=user.name)
    return dispatcher.deploy(
        body.image, body.count, min_count=body.min_count,
        vcpus=applications.DEFAULT_VCPUS if body.vcpus is None else body.vcpus,
        memory_mib=(applications.DEFAULT_MEMORY_MIB if body.memory_mib is None
                    else body.memory_mib),
        boot=body.boot.as_request() if body.boot is not None else {},
        health=applications.health_request(body.health), cloud=cloud, port=body.port,
        protocol=body.protocol, owner=user.name)


def _check_member_may(body: DeploymentCreate) -> None:
    """A member's deploy may not name files of the compute hosts (a kernel or initrd
    path: the host would read any file into the member's guest) nor a console pattern
    (a regular expression every console line of the host's guests is matched against).

    :raises: Forbidden.
    """
    boot = body.boot.as_request() if body.boot is not None else {}
    paths = [boot[k] for k in ('kernel', 'initrd') if boot.get(k, '').startswith('/')]
    if paths:
        raise exception.Forbidden(
            f'only an admin may boot files of the compute hosts ({", ".join(paths)}): '
            'name warehouse images (NAME[:VERSION]) as kernel and initrd')
    if (applications.health_request(body.health) or {}).get('kind') == 'console':
        raise exception.Forbidden('only an admin may set a console health pattern')


def check_can_delete(user: auth.User, deployment: dict) -> None:
    """:raises: Forbidden unless ``user`` is an admin or the deployment's owner."""
    if user.is_admin or (deployment.get('owner') is not None
                         and deployment.get('owner') == user.name):
        return
    raise exception.Forbidden(f'deployment {deployment["id"]} is not user {user.name}\'s: '
                              f'only its owner or an admin deletes it')


@router.get('', response_model=DeploymentList, response_model_exclude_unset=True)
def list_deployments(request: fastapi.Request,
                     cloud: str | None = fastapi.Query(None, min_length=1, max_length=32),
                     owner: str | None = fastapi.Query(None, min_length=1, max_length=64),
                     page: pagination.Page = page_of,
                     services: context.Services = services_of) -> dict:
    """Deployments newest first (in ``cloud``, of ``owner``, if given), deleted ones
    too; without their instances (see one deployment for those)."""
    rows = services.dispatcher.list_deployments(limit=page.rows_wanted, marker=page.marker,
                                                cloud=cloud, owner=owner)
    return pagination.listed(request, 'deployments', rows, page, 'id')


@router.post('', status_code=202, response_model=DeploymentBody,
             response_model_exclude_unset=True)
def create_deployment(body: DeploymentCreate, response: fastapi.Response,
                      user: auth.User = user_of,
                      services: context.Services = services_of) -> dict:
    """Deploy: the instances are placed now and build from then on (202); the
    deployment's progress says how far they are."""
    deployment = with_progress(create(services, user, body))
    response.headers['Location'] = f'{router.prefix}/{quoted(deployment["id"])}'
    return {'deployment': deployment}


@router.get('/{deployment_id}', response_model=DeploymentBody,
            response_model_exclude_unset=True)
def show_deployment(deployment_id: str = id_path(),
                    services: context.Services = services_of) -> dict:
    """:raises: DeploymentNotFound (404)."""
    return {'deployment': with_progress(services.dispatcher.show_deployment(deployment_id))}


@router.delete('/{deployment_id}', status_code=202, response_model=DeploymentBody,
               response_model_exclude_unset=True)
def delete_deployment(deployment_id: str = id_path(), user: auth.User = user_of,
                      services: context.Services = services_of) -> dict:
    """Delete it (202: its instances are deleting until their hosts confirm).

    :raises: Forbidden (403) for a member who does not own it; DeploymentNotFound (404).
    """
    check_can_delete(user, services.dispatcher.show_deployment(deployment_id))
    return {'deployment': with_progress(services.dispatcher.delete_deployment(deployment_id))}


@router.post('/{deployment_id}/snapshots', status_code=202,
             dependencies=[fastapi.Depends(auth.require_admin)], response_model=SnapshotBody,
             response_model_exclude_unset=True)
def snapshot_deployment(response: fastapi.Response, deployment_id: str = id_path(),
                        services: context.Services = services_of) -> dict:
    """Snapshot every active instance at one cut (the answer comes once the cut is
    taken; the uploads go on: 202).

    :raises: DeploymentNotFound (404), InvalidRequest (422).
    """
    snapshot = services.dispatcher.snapshot(deployment_id)
    response.headers['Location'] = f'/v1/snapshots/{quoted(snapshot["id"])}'
    return {'snapshot': snapshot}
