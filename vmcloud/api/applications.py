"""``/v1/applications``: what a cloud deploys by name (an image, its size, boot, health
check, service and connection limit). Reads for every user; changes for admins.

The request models check the form of what is asked (names, ranges, the shapes of boot
and health); the dispatcher checks the rest (the image exists, the health check's
timeout fits its build_timeout...) and says what is wrong (422).

The boot and health models are deploy's too (vmcloud.api.deployments).
"""
import re
from typing import Annotated, Any, Literal, Union

import fastapi
import pydantic

from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import pagination

router = fastapi.APIRouter(prefix='/v1/applications', tags=['applications'],
                           dependencies=[fastapi.Depends(auth.current_user)])
admin_only = [fastapi.Depends(auth.require_admin)]
services_of = fastapi.Depends(context.services)
page_of = fastapi.Depends(pagination.params)

# The dispatcher's rules (vmcloud.dispatcher.clouds, vmcloud.storage.manifest,
# vmcloud.compute.readiness), which the API may not import: checked there again.
APPLICATION_NAME = r'^[a-z0-9-]{1,64}$'
IMAGE_NAME = r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$'
IMAGE_REF = r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(:[0-9]{1,18})?$'
PROTOCOLS = ('http', 'tcp')
# Bounds of the form only: the scheduler says whether such an instance fits anywhere.
MAX_VCPUS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024
MAX_CONNECTION_LIMIT = 10 ** 9
# A deployment keeps boot as JSON in 4000 characters: three fields of this fit.
MAX_BOOT_FIELD = 1024
# An instance's size when none is given (as the dispatcher's deploy).
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256

ApplicationName = Annotated[str, pydantic.Field(pattern=APPLICATION_NAME,
                                                description='1 to 64 of a-z 0-9 -')]
ImageRef = Annotated[str, pydantic.Field(pattern=IMAGE_REF,
                                         description='IMAGE or IMAGE:VERSION (a warehouse '
                                                     'image; without a version its latest '
                                                     'at each deploy)')]
Port = Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=65535)]
Protocol = Literal['http', 'tcp']
Vcpus = Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=MAX_VCPUS)]
MemoryMib = Annotated[int, pydantic.Strict(), pydantic.Field(ge=1, le=MAX_MEMORY_MIB)]
ConnectionLimit = Annotated[int, pydantic.Strict(),
                            pydantic.Field(ge=1, le=MAX_CONNECTION_LIMIT)]
Seconds = Annotated[float, pydantic.Strict(), pydantic.Field(gt=0)]


class Body(pydantic.BaseModel):
    """A request body: a field it does not know is refused (422), never ignored."""
    model_config = pydantic.ConfigDict(extra='forbid')


class Shown(pydantic.BaseModel):
    """What the API answers: the fields named are described in the OpenAPI document;
    every other field the dispatcher gives is passed on as it is."""
    model_config = pydantic.ConfigDict(extra='allow')


class Boot(Body):
    """How the instances boot: a kernel and initrd (warehouse images ``NAME[:VERSION]``,
    pinned at each deploy, or absolute paths of files on every compute host) and the
    kernel's command line (``{name}`` in it becomes the instance's name). None of them:
    the image boots by itself."""
    kernel: str | None = pydantic.Field(None, min_length=1, max_length=MAX_BOOT_FIELD)
    initrd: str | None = pydantic.Field(None, min_length=1, max_length=MAX_BOOT_FIELD)
    cmdline: str | None = pydantic.Field(None, max_length=MAX_BOOT_FIELD)

    def as_request(self) -> dict:
        return self.model_dump(exclude_none=True)


class MarkerHealth(Body):
    """Ready when the guest prints vmcloud's boot-done marker (the default)."""
    kind: Literal['marker']
    timeout: Seconds | None = None


class TcpHealth(Body):
    """Ready when the guest accepts a TCP connection on ``port``."""
    kind: Literal['tcp']
    port: Port
    timeout: Seconds | None = None


class HttpHealth(Body):
    """Ready when ``path`` on ``port`` answers below 500."""
    kind: Literal['http']
    port: Port
    path: str = pydantic.Field('/', pattern=r'^/\S*$', max_length=1024)
    timeout: Seconds | None = None


class ConsoleHealth(Body):
    """Ready when a console line matches ``pattern`` (a regular expression)."""
    kind: Literal['console']
    pattern: str = pydantic.Field(min_length=1, max_length=1024)
    timeout: Seconds | None = None

    @pydantic.field_validator('pattern')
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f'not a regular expression: {exc}') from None
        return pattern


Health = Annotated[Union[MarkerHealth, TcpHealth, HttpHealth, ConsoleHealth],
                   pydantic.Field(discriminator='kind')]


def health_request(health: pydantic.BaseModel | None) -> dict | None:
    """The dispatcher's form of a health check (None: the default, the marker)."""
    return None if health is None else health.model_dump(exclude_none=True)


class ApplicationCreate(Body):
    name: ApplicationName
    image: ImageRef
    port: Port = pydantic.Field(description='The guests\' service port, exposed on the '
                                            'gateway')
    protocol: Protocol
    vcpus: Vcpus = DEFAULT_VCPUS
    memory_mib: MemoryMib = DEFAULT_MEMORY_MIB
    boot: Boot = pydantic.Field(default_factory=Boot)
    health: Health | None = None
    connection_limit: ConnectionLimit | None = pydantic.Field(
        None, description='At most this many connections at once, over every cloud '
                          '(null: its cloud\'s limit only)')


class ApplicationUpdate(Body):
    """Any of the fields to change; ``connection_limit`` null clears the limit. New
    deployments use the application as it is then; a new limit holds at once."""
    image: ImageRef | None = None
    port: Port | None = None
    protocol: Protocol | None = None
    vcpus: Vcpus | None = None
    memory_mib: MemoryMib | None = None
    boot: Boot | None = None
    health: Health | None = None
    connection_limit: ConnectionLimit | None = None

    @pydantic.model_validator(mode='after')
    def _only_the_limit_clears(self) -> 'ApplicationUpdate':
        nulls = sorted(f for f in self.model_fields_set
                       if getattr(self, f) is None and f != 'connection_limit')
        if nulls:
            raise ValueError(f'{", ".join(nulls)} cannot be null (only connection_limit '
                             f'can: null clears it)')
        return self

    def changes(self) -> dict:
        """The fields given, in the dispatcher's form (update_application)."""
        changes = {}
        for field in sorted(self.model_fields_set):
            value = getattr(self, field)
            if field == 'boot':
                value = value.as_request()
            elif field == 'health':
                value = health_request(value)
            changes[field] = value
        return changes


class Application(Shown):
    name: str
    image: str
    port: int
    protocol: str
    vcpus: int
    memory_mib: int
    boot: dict[str, Any] = {}
    health: dict[str, Any] | None = None
    connection_limit: int | None = None
    created_at: str | None = None
    deployments: list[str] = pydantic.Field(
        [], description='The ids of its deployments that are not deleted')


class ApplicationBody(pydantic.BaseModel):
    application: Application


class Link(pydantic.BaseModel):
    rel: str
    href: str


class ApplicationList(pydantic.BaseModel):
    applications: list[Application]
    applications_links: list[Link]


def _location(name: str) -> str:
    return f'{router.prefix}/{name}'


def create(services: context.Services, body: ApplicationCreate) -> dict:
    """Create the application ``body`` describes (the caller checked the user is an
    admin).

    :raises: NameInUse (409), ImageNotFound (404), InvalidRequest (422).
    """
    return services.dispatcher.create_application(
        body.name, body.image, body.port, body.protocol, vcpus=body.vcpus,
        memory_mib=body.memory_mib, boot=body.boot.as_request(),
        health=health_request(body.health), connection_limit=body.connection_limit)


@router.get('', response_model=ApplicationList, response_model_exclude_unset=True)
def list_applications(request: fastapi.Request, page: pagination.Page = page_of,
                      services: context.Services = services_of) -> dict:
    """Applications by name."""
    rows = services.dispatcher.list_applications(limit=page.rows_wanted, marker=page.marker)
    return pagination.listed(request, 'applications', rows, page, 'name')


@router.post('', status_code=201, dependencies=admin_only, response_model=ApplicationBody,
             response_model_exclude_unset=True)
def create_application(body: ApplicationCreate, response: fastapi.Response,
                       services: context.Services = services_of) -> dict:
    """:raises: NameInUse (409), ImageNotFound (404), InvalidRequest (422)."""
    application = create(services, body)
    response.headers['Location'] = _location(application['name'])
    return {'application': application}


@router.get('/{name}', response_model=ApplicationBody, response_model_exclude_unset=True)
def show_application(name: str, services: context.Services = services_of) -> dict:
    return {'application': services.dispatcher.show_application(name)}


@router.patch('/{name}', dependencies=admin_only, response_model=ApplicationBody,
              response_model_exclude_unset=True)
def update_application(name: str, body: ApplicationUpdate,
                       services: context.Services = services_of) -> dict:
    changes = body.changes()
    if not changes:  # nothing asked: nothing for the dispatcher to check or refresh
        return {'application': services.dispatcher.show_application(name)}
    return {'application': services.dispatcher.update_application(name, changes)}


@router.delete('/{name}', status_code=204, dependencies=admin_only,
               response_class=fastapi.Response)
def delete_application(name: str, services: context.Services = services_of):
    """:raises: InUse (409) while a deployment of it is not deleted."""
    services.dispatcher.delete_application(name)
    return fastapi.Response(status_code=204)
