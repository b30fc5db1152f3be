"""Bearer-token authentication for the warehouse service.

Every request carries ``Authorization: Bearer TOKEN``; the token is compared in
constant time (hmac.compare_digest). Reads (GET, HEAD) may be anonymous only if
``[warehouse_service] allow_anonymous_reads`` says so. A refusal is a 401 that
names nothing secret: not the token expected, not the one received.
"""
import hmac

from aiohttp import web

from vmcloud import exception
from vmcloud.storage import protocol

READ_METHODS = ('GET', 'HEAD')


def token_ok(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``token``."""
    if not header or not header.startswith('Bearer '):
        return False
    return hmac.compare_digest(header[len('Bearer '):].encode(), token.encode())


def middleware(token: str, anonymous_reads: bool):
    """An aiohttp middleware refusing every request without the token.

    :raises: ConfigError if ``token`` is empty: writes are never anonymous.
    """
    if not token:
        raise exception.ConfigError(
            '[warehouse_service] token is not set: the service refuses anonymous writes')

    @web.middleware
    async def check(request: web.Request, handler):
        if anonymous_reads and request.method in READ_METHODS:
            return await handler(request)
        if not token_ok(request.headers.get('Authorization'), token):
            status, body = protocol.encode_error(
                protocol.Unauthorized('missing or wrong bearer token'))
            return web.Response(status=status, body=body, content_type='application/json',
                                headers={'WWW-Authenticate': 'Bearer realm="vmcloud-warehouse"'})
        return await handler(request)

    return check
