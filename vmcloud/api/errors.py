"""Every error the API answers has one body:

    {"error": {"code": 404, "title": "Not Found", "message": "cloud x not found",
               "request_id": "req-...", "type": "CloudNotFound", "fields": {"name": "x"}}}

the VmcloudErrors the dispatcher raises (status by class, ``status_of``), FastAPI's own
(no such route 404, no such method 405, a body or query that does not validate 422,
naming the field), and the API's (401, 403, 413, 429). A VmcloudError's answer also
names its class (``type``) and its fields (``vmcloud.rpc.error_fields``): a client
raises the same error again from them (``vmcloud.rpc.rebuilt_error``) instead of
reading the message.
"""
import http
import logging
import math

import fastapi
import pydantic
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
from starlette import exceptions as starlette_exceptions

from vmcloud import exception
from vmcloud import rpc
from vmcloud.api import context

LOG = logging.getLogger(__name__)

# Checked in this order: the first class the error is an instance of gives its status.
_STATUSES: tuple[tuple[tuple[type[exception.VmcloudError], ...], int], ...] = (
    ((exception.Unauthorized,), 401),
    ((exception.Forbidden,), 403),
    ((exception.LoginThrottled,), 429),
    ((exception.CloudNotFound, exception.ApplicationNotFound, exception.DeploymentNotFound,
      exception.HostNotFound, exception.ImageNotFound, exception.SnapshotNotFound,
      exception.UserNotFound), 404),
    ((exception.NameInUse, exception.InUse, exception.NoValidHost,
      exception.AddressPoolExhausted, exception.ListenerPortsExhausted,
      exception.ImageExists, exception.VersionExists, exception.ImageInUse), 409),
    ((exception.MarkerNotFound,), 400),
    # An image name or version of the wrong form is the request's fault, like any other
    # InvalidRequest.
    ((exception.UnsafeImage, exception.CorruptManifest, exception.InvalidName,
      exception.InvalidRequest), 422),
    ((exception.GatewayUnavailable, exception.DispatcherUnavailable,
      exception.MessagingError), 503),
)


def status_of(error: exception.VmcloudError) -> int:
    """The HTTP status that answers ``error``: 500 for a VmcloudError of no class below
    (its message is still shown: vmcloud's errors say what failed, never a secret)."""
    for classes, status in _STATUSES:
        if isinstance(error, classes):
            return status
    return 500


def body(status: int, message: str, request_id: str,
         error: exception.VmcloudError | None = None) -> dict:
    """The error body; ``error``: the VmcloudError it answers, named with its fields."""
    detail = {'code': status, 'title': http.HTTPStatus(status).phrase,
              'message': message, 'request_id': request_id}
    if error is not None:
        detail.update(type=type(error).__name__, fields=rpc.error_fields(error))
    return {'error': detail}


def response(request_id: str, status: int, message: str,
             headers: dict | None = None,
             error: exception.VmcloudError | None = None) -> responses.JSONResponse:
    """The error answer of ``status`` (``headers`` added: Allow, Retry-After...;
    ``error``: the VmcloudError it answers)."""
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault('WWW-Authenticate', 'Token')
    return responses.JSONResponse(body(status, message, request_id, error),
                                  status_code=status, headers=headers)


class ErrorDetail(pydantic.BaseModel):
    code: int
    title: str
    message: str
    request_id: str
    type: str | None = pydantic.Field(
        None, description='The vmcloud error\'s class (vmcloud.exception), when a vmcloud '
                          'error is answered', examples=['CloudNotFound'])
    fields: dict | None = pydantic.Field(
        None, description='Its fields, with the class: what rebuilds it',
        examples=[{'name': 'x'}])


class ErrorBody(pydantic.BaseModel):
    """Every error answer of the API."""
    error: ErrorDetail


# The OpenAPI document's error answers, on every route (FastAPI(responses=...)).
RESPONSES = {
    status: {'model': ErrorBody, 'description': description}
    for status, description in (
        (400, 'An unknown marker'),
        (401, 'No token, or an unknown or expired one (WWW-Authenticate: Token)'),
        (403, 'The caller\'s role does not allow it'),
        (404, 'No such resource or route'),
        (409, 'A conflict with what exists (a name taken, a resource in use, no room)'),
        (413, 'The body is larger than [api] max_body_bytes'),
        (422, 'The body or a parameter does not validate; the message names the field'),
        (429, 'Too many failed logins; Retry-After says when to try again'),
        (500, 'A fault of the API or of the dispatcher'),
        (503, 'The dispatcher or the gateway does not answer'),
    )
}
# What only answers a caller with a token: not in the document of a public route.
AUTHENTICATED_ONLY = ('401', '403')


def _vmcloud_error(request: fastapi.Request, error: exception.VmcloudError):
    status = status_of(error)
    headers = {}
    if isinstance(error, exception.LoginThrottled):
        headers['Retry-After'] = str(max(1, math.ceil(error.retry_after)))
    if status >= 500:
        # The request id is current: the line leads to the dispatcher's lines.
        LOG.error('%s %s: %s: %s', request.method, request.url.path,
                  type(error).__name__, error)
    else:
        LOG.info('%s %s: %d: %s', request.method, request.url.path, status, error)
    return response(context.request_id(request), status, str(error), headers, error)


def _http_error(request: fastapi.Request, error: starlette_exceptions.HTTPException):
    status = error.status_code
    if status == 400 and isinstance(error.__cause__, UnicodeDecodeError):
        # FastAPI's answer to a JSON body that is not UTF-8: invalid JSON, as any other.
        return response(context.request_id(request), 422,
                        'body: the body is not valid JSON: it is not UTF-8 text')
    message = error.detail if isinstance(error.detail, str) and error.detail else None
    if message is None or message == http.HTTPStatus(status).phrase:
        message = _DEFAULT_MESSAGES.get(status, http.HTTPStatus(status).phrase).format(
            method=request.method, path=request.url.path)
    return response(context.request_id(request), status, message, error.headers)


_DEFAULT_MESSAGES = {
    404: 'no such resource: {path}',
    405: 'method {method} is not allowed on {path}',
}


def _validation_error(request: fastapi.Request,
                      error: fastapi_exceptions.RequestValidationError):
    message = validation_message(error.errors())
    LOG.info('%s %s: 422: %s', request.method, request.url.path, message)
    return response(context.request_id(request), 422, message)


def validation_message(errors) -> str:
    """pydantic's errors as one line, each with its field path: ``body.health.port:
    Input should be a valid integer``. The values given are not repeated (they may be
    large, or secret)."""
    parts = []
    for each in errors:
        where = '.'.join(str(step) for step in each.get('loc', ()))
        text = each.get('msg', 'invalid')
        if each.get('type') == 'json_invalid':
            error = (each.get('ctx') or {}).get('error')
            text = f'the body is not valid JSON: {error}' if error else \
                'the body is not valid JSON'
            where = 'body'
        parts.append(f'{where}: {text}' if where else text)
    return '; '.join(parts) or 'the request does not validate'


def install(app: fastapi.FastAPI) -> None:
    """Answer VmcloudError, HTTPException (FastAPI's and Starlette's: 404, 405...) and
    RequestValidationError with the error body. (Any other exception is the middleware's
    500, see app.py.)"""
    app.add_exception_handler(exception.VmcloudError, _vmcloud_error)
    app.add_exception_handler(starlette_exceptions.HTTPException, _http_error)
    app.add_exception_handler(fastapi_exceptions.RequestValidationError, _validation_error)
