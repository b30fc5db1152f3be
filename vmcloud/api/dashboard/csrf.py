"""The dashboard's defence against cross-site request forgery: a double submit.

A random value lives in the cookie ``vmcloud_csrf`` (set on the first dashboard page a
browser gets without it) and in the hidden field ``csrf_token`` of every form; a POST
whose field does not equal its cookie is refused before anything is done. Another site
can make a browser send the cookie but can neither read it nor set it (SameSite=Strict,
and it is the dashboard's own origin), so it cannot fill in the field. An ``Origin``
header, which browsers send with every POST they make, must name the dashboard's host:
a second check that costs nothing.
"""
import hmac
import re
import secrets
import urllib.parse

import fastapi
from starlette import datastructures

from vmcloud import exception

COOKIE = 'vmcloud_csrf'
FIELD = 'csrf_token'
# token_urlsafe(32): 43 characters of the URL-safe alphabet. A cookie of any other form
# was not set by us: it is replaced rather than compared.
_TOKEN = re.compile(r'[A-Za-z0-9_-]{43}\Z')


class CsrfRejected(exception.Forbidden):
    """A dashboard POST without the CSRF token of its cookie, or from another origin."""


def token(request: fastapi.Request) -> str:
    """The CSRF token of this browser: its cookie's, or a new one that the response sets
    (``set_cookie``) for the forms of this page to carry."""
    current = getattr(request.state, 'csrf_token', None)
    if current is None:
        cookie = request.cookies.get(COOKIE, '')
        current = cookie if _TOKEN.match(cookie) else None
        if current is None:
            current = secrets.token_urlsafe(32)
            request.state.csrf_new = True
        request.state.csrf_token = current
    return current


def set_cookie(request: fastapi.Request, response: fastapi.Response, secure: bool) -> None:
    """Set the cookie of a token ``token`` made for this request, if it made one."""
    if getattr(request.state, 'csrf_new', False):
        # HttpOnly: the pages carry the token in their forms, no script reads it.
        # SameSite=Strict: other sites' requests go without it.
        response.set_cookie(COOKIE, request.state.csrf_token, path='/', secure=secure,
                            httponly=True, samesite='strict')


def check(request: fastapi.Request, submitted: object) -> None:
    """:raises: CsrfRejected unless ``submitted`` (the form's field) equals the cookie's
    token and the Origin, if any, is this host."""
    origin = request.headers.get('origin')
    if origin is not None and not _same_host(origin, request.headers.get('host', '')):
        raise CsrfRejected(f'this form was sent from {origin}, not from this dashboard; '
                           f'nothing was done')
    cookie = request.cookies.get(COOKIE, '')
    if not isinstance(submitted, str) or not _TOKEN.match(cookie) or not hmac.compare_digest(
            submitted.encode(), cookie.encode()):
        raise CsrfRejected('this form is stale or was not sent by this dashboard (its '
                           'security token does not match); nothing was done: reload the '
                           'page and try again')


async def checked_form(request: fastapi.Request) -> datastructures.FormData:
    """The fields of a dashboard POST, once its CSRF token and Origin passed: the one way
    the dashboard's endpoints read a form, so none can forget the check.

    :raises: CsrfRejected.
    """
    form = await request.form()
    check(request, form.get(FIELD))
    return form


def _same_host(origin: str, host: str) -> bool:
    parts = urllib.parse.urlsplit(origin)
    return (parts.scheme in ('http', 'https') and bool(host)
            and parts.netloc.lower() == host.lower())
