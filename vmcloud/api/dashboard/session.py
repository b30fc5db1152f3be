"""Who is using the dashboard: a token of the API's Identity in the cookie
``vmcloud_session``, set at login and revoked at logout."""
import re
import urllib.parse

import fastapi

from vmcloud import exception
from vmcloud.api import auth
from vmcloud.api import context

COOKIE = 'vmcloud_session'
HOME = '/dashboard/'
LOGIN = '/dashboard/login'
# Where a login may send the browser on: a dashboard page of this host, in characters a
# path and query need (no scheme, no host, no backslash, no control character).
_LOCAL_PAGE = re.compile(r'/dashboard(/[A-Za-z0-9._~!$&\'()*+,;=:@/%-]*)?'
                         r'(\?[A-Za-z0-9._~!$&\'()*+,;=:@/?%-]*)?\Z')


def current_user(request: fastapi.Request,
                 services: context.Services = fastapi.Depends(context.services)) -> auth.User:
    """The user of the session cookie (a dependency of every page but the login's); kept
    in ``request.state.user`` for the layout.

    :raises: Unauthorized without a valid, unexpired session (pages answer it with the
        login page).
    """
    token = request.cookies.get(COOKIE)
    if not token:
        raise exception.Unauthorized('not logged in')
    user = services.identity.validate(token)
    request.state.user = user
    return user


def start(response: fastapi.Response, conf, token: str) -> None:
    """The browser holds the session ``token`` from now on, for the token's lifetime."""
    # HttpOnly: no script of any page can read it; Strict: no other site's request
    # carries it (with the CSRF token, forms of other sites get nowhere).
    response.set_cookie(COOKIE, token, max_age=conf.api.token_ttl, path='/', httponly=True,
                        samesite='strict', secure=conf.api.secure_cookies)


def end(response: fastapi.Response, conf) -> None:
    response.delete_cookie(COOKIE, path='/', httponly=True, samesite='strict',
                           secure=conf.api.secure_cookies)


def next_page(target: str | None) -> str:
    """``target`` if it is a dashboard page of this host, else the overview: a login
    never sends the browser off to another site."""
    if not target or not _LOCAL_PAGE.match(target) or target.startswith(LOGIN):
        return HOME
    path = urllib.parse.unquote(target.partition('?')[0])
    # '/dashboard/../v1' is the API's /v1 to a browser: a page of the dashboard it is not.
    if any(segment in ('.', '..') for segment in path.split('/')):
        return HOME
    return target


def login_url(request: fastapi.Request) -> str:
    """The login page, to come back to the page asked for after it."""
    wanted = request.url.path + (f'?{request.url.query}' if request.url.query else '')
    if next_page(wanted) == HOME:
        return LOGIN
    return f'{LOGIN}?{urllib.parse.urlencode({"next": wanted})}'
