"""``/v1/users``: the API's users, for admins only. Passwords are stored as argon2
hashes and never shown."""
from typing import Annotated, Literal

import fastapi
import pydantic

from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import pagination

router = fastapi.APIRouter(prefix='/v1/users', tags=['users'],
                           dependencies=[fastapi.Depends(auth.require_admin)])

Role = Literal['admin', 'member']
Password = Annotated[str, pydantic.Field(min_length=auth.MIN_PASSWORD,
                                         max_length=auth.MAX_PASSWORD)]


class UserCreate(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='forbid')

    name: str = pydantic.Field(pattern=auth.NAME_PATTERN,
                               description='1 to 64 of a-z 0-9 . _ -')
    password: Password
    role: Role


class UserUpdate(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='forbid')

    password: Password | None = None
    role: Role | None = None


@router.get('')
def list_users(request: fastapi.Request,
               page: pagination.Page = fastapi.Depends(pagination.params),
               services: context.Services = fastapi.Depends(context.services)) -> dict:
    """Users by name."""
    rows = services.identity.list_users(limit=page.rows_wanted, marker=page.marker)
    return pagination.listed(request, 'users', rows, page, 'name')


@router.post('', status_code=201)
def create_user(body: UserCreate, response: fastapi.Response,
                services: context.Services = fastapi.Depends(context.services)) -> dict:
    user = services.identity.create_user(body.name, body.password, body.role)
    response.headers['Location'] = f'{router.prefix}/{user["name"]}'
    return {'user': user}


@router.get('/{name}')
def show_user(name: str, services: context.Services = fastapi.Depends(context.services)) -> dict:
    return {'user': services.identity.show_user(name)}


@router.patch('/{name}')
def update_user(name: str, body: UserUpdate,
                services: context.Services = fastapi.Depends(context.services)) -> dict:
    """A new role holds at once for the user's tokens; a new password for its next
    logins."""
    return {'user': services.identity.update_user(name, password=body.password,
                                                  role=body.role)}


@router.delete('/{name}', status_code=204)
def delete_user(name: str, services: context.Services = fastapi.Depends(context.services)):
    """The user and every token of it."""
    services.identity.delete_user(name)
    return fastapi.Response(status_code=204)
