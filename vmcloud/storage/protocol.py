"""What client and service agree on: paths, headers, and errors as JSON.

An error crosses the wire as ``{"error": CLASS, "message": TEXT, "fields": {...}}``
with an HTTP status that says roughly what went wrong; the client rebuilds the
same vmcloud exception class with the same fields from the JSON, never from the
status alone.
"""
import json

from vmcloud import exception

API = '/v1'
# The longest chunk a PUT may carry; larger bodies are refused before they are read.
MAX_CHUNK_BYTES = 64 * 1024 ** 2
# The most ids one "which of these do you lack?" request may ask about.
MAX_MISSING_QUERY = 10000
LEASE_KINDS = ('shared', 'exclusive', 'image')

# class -> (HTTP status, the constructor's fields in order); a class not named
# here but under StorageError travels as its message alone.
_ERRORS: dict[type, tuple[int, tuple[str, ...]]] = {
    exception.ImageNotFound: (404, ('image', 'version')),
    exception.ChunkNotFound: (404, ('chunk_id',)),
    exception.VersionExists: (409, ('image', 'version')),
    exception.ImageExists: (409, ('image',)),
    # CorruptChunk keeps no ``actual``: its message names it.
    exception.CorruptChunk: (422, ('chunk_id', 'actual')),
    exception.CorruptManifest: (500, ()),
    exception.WarehouseBusy: (503, ()),
    exception.InvalidName: (400, ()),
    exception.InvalidRange: (400, ()),
    exception.AttachmentTooLarge: (413, ()),
    exception.StorageError: (500, ()),
}
_BY_NAME = {cls.__name__: cls for cls in _ERRORS}


class RequestRefused(exception.StorageError):
    """The request itself was wrong (a bad lease, session or body); a client bug or a
    service restart, not a storage problem."""


class Unauthorized(exception.StorageError):
    """The service refused the bearer token (or its absence)."""


_ERRORS.update({exception.LeaseLost: (410, ()), RequestRefused: (400, ()),
                Unauthorized: (401, ())})
_BY_NAME.update({cls.__name__: cls
                 for cls in (exception.LeaseLost, RequestRefused, Unauthorized)})


def _registered(error: exception.StorageError) -> type:
    for cls in type(error).__mro__:
        if cls in _ERRORS:
            return cls
    return exception.StorageError


def encode_error(error: exception.VmcloudError) -> tuple[int, bytes]:
    """(HTTP status, JSON body) for an error raised by the backend or the service."""
    cls = _registered(error) if isinstance(error, exception.StorageError) \
        else exception.StorageError
    status, names = _ERRORS[cls]
    body = {'error': cls.__name__, 'message': str(error),
            'fields': {name: getattr(error, name, None) for name in names}}
    return status, json.dumps(body).encode()


def decode_error(status: int, body: bytes, where: str) -> exception.StorageError:
    """The exception the service sent, rebuilt; a StorageError naming ``where`` if the
    body is not one of ours (a proxy's error page, a truncated answer)."""
    try:
        doc = json.loads(body)
        cls = _BY_NAME[doc['error']]
        message, fields = str(doc['message']), dict(doc.get('fields') or {})
    except (ValueError, KeyError, TypeError):
        text = body[:200].decode('utf-8', 'replace').strip().replace('\n', ' ')
        return exception.StorageError(f'{where} answered HTTP {status}: {text or "no body"}')
    _, names = _ERRORS[cls]
    try:
        error = cls(*(fields.get(name) for name in names)) if names else cls(message)
    except TypeError:
        error = exception.StorageError(message)
    # The service's own words, whatever the constructor would have said here.
    error.args = (message,)
    return error
