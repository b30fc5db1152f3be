"""``/v1/auth/tokens``: log in for a token, show the current one, revoke it."""
import fastapi
import pydantic

from vmcloud.api import auth
from vmcloud.api import context

router = fastapi.APIRouter(prefix='/v1/auth/tokens', tags=['auth'])


class TokenCreate(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='forbid')

    username: str = pydantic.Field(min_length=1, max_length=auth.MAX_USER_NAME)
    password: str = pydantic.Field(min_length=1, max_length=auth.MAX_PASSWORD)


@router.post('', status_code=201)
def create_token(body: TokenCreate, request: fastapi.Request, response: fastapi.Response,
                 services: context.Services = fastapi.Depends(context.services)) -> dict:
    """Log in: a token valid for [api] token_ttl seconds, also in the X-Subject-Token
    header. Failed logins are throttled per user name and per client address (429)."""
    token = services.identity.login(body.username, body.password,
                                    auth.client_address(request))
    response.headers['X-Subject-Token'] = token['id']
    response.headers['Location'] = router.prefix
    return {'token': token}


@router.get('')
def show_token(request: fastapi.Request, user: auth.User = fastapi.Depends(auth.current_user),
               services: context.Services = fastapi.Depends(context.services)) -> dict:
    """The caller's token: when it expires, whose it is (not the token itself)."""
    return {'token': services.identity.show_token(auth.request_token(request))}


@router.delete('', status_code=204)
def revoke_token(request: fastapi.Request, user: auth.User = fastapi.Depends(auth.current_user),
                 services: context.Services = fastapi.Depends(context.services)):
    """Revoke the caller's token (the user's other tokens stay valid)."""
    services.identity.revoke(auth.request_token(request))
    return fastapi.Response(status_code=204)
