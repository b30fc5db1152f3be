"""Bearer-token authentication for the warehouse service, and the token check of
every vmcloud HTTP server that takes a bearer token (the peer chunk servers too).

Every request carries ``Authorization: Bearer TOKEN``; the token is compared in
constant time (hmac.compare_digest). Reads (GET, HEAD) may be anonymous only if
``[warehouse_service] allow_anonymous_reads`` says so. A refusal is a 401 that
names nothing secret: not the token expected, not the one received.

aiohttp is imported by ``middleware`` alone: ``token_ok`` serves the peer chunk
servers of the compute nodes, which run no aiohttp.
"""
import hmac

from vmcloud import exception
from vmcloud.storage import protocol

READ_METHODS = ('GET', 'HEAD')


def token_ok(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``token`` as a bearer token, compared in
    constant time (how long it takes tells nothing of the token)."""
    if not header or not header.startswith('Bearer '):
        return False
    return hmac.compare_digest(header[len('Bearer '):].encode(), token.encode())


def middleware(token: str, anonymous_reads: bool):
    """An aiohttp middleware refusing every request without the token.

    :raises: ConfigError if ``token`` is empty: writes are never anonymous.
    """
    from aiohttp import web

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
