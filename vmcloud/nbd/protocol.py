"""NBD wire constants and structures (fixed newstyle), as doc/proto.md of the NBD project says.

Only what the server speaks is here: no old-style negotiation, no TLS, no
extended headers. Everything is big-endian. The pure parsing helpers live
here too so that they can be tested without a socket.
"""
import struct

from vmcloud import exception

# -- handshake -------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943        # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054        # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9

# Handshake flags (server) and client flags share their two bits.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR | 1
REP_ERR_POLICY = _REP_ERR | 2
REP_ERR_INVALID = _REP_ERR | 3
REP_ERR_PLATFORM = _REP_ERR | 4
REP_ERR_TLS_REQD = _REP_ERR | 5
REP_ERR_UNKNOWN = _REP_ERR | 6
REP_ERR_SHUTDOWN = _REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
REP_ERR_TOO_BIG = _REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags, sent with the export size.
TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_FUA = 1 << 3
TFLAG_ROTATIONAL = 1 << 4
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
TFLAG_SEND_DF = 1 << 7
TFLAG_CAN_MULTI_CONN = 1 << 8
TFLAG_SEND_RESIZE = 1 << 9
TFLAG_SEND_CACHE = 1 << 10

META_CONTEXT_BASE_ALLOCATION = 'base:allocation'
# Any number works; it only has to be stable within a connection.
META_CONTEXT_BASE_ALLOCATION_ID = 1

BLOCK_SIZE_MIN = 1
BLOCK_SIZE_PREFERRED = 4096
BLOCK_SIZE_MAX = 32 * 1024 * 1024
MAX_NAME = 4096                      # the spec's limit for export and context names
MAX_OPTION_PAYLOAD = 64 * 1024       # far above any honest option; larger ones are refused

# Handshake structures.
HELLO = struct.Struct('>QQH')            # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct('>I')
OPTION_HEADER = struct.Struct('>QII')    # IHAVEOPT, option, payload length
OPTION_REPLY = struct.Struct('>QIII')    # magic, option, reply type, payload length
EXPORT_NAME_REPLY = struct.Struct('>QH')  # size, transmission flags (then 124 zeroes)
INFO_EXPORT_REPLY = struct.Struct('>HQH')  # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_REPLY = struct.Struct('>HIII')

# -- transmission ----------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

REQUEST = struct.Struct('>IHHQQI')         # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct('>IIQ')       # magic, error, cookie
STRUCTURED_REPLY = struct.Struct('>IHHQI')  # magic, flags, type, cookie, payload length
OFFSET_DATA_HEADER = struct.Struct('>IHHQIQ')  # structured reply header + offset
ERROR_PAYLOAD = struct.Struct('>IH')       # error, message length
BLOCK_DESCRIPTOR = struct.Struct('>II')    # length, status flags

# NBD error numbers. They happen to match Linux errno values, but the wire
# protocol fixes them, so they are spelled out rather than taken from errno.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_ERRNO_TO_NBD = {
    1: EPERM, 5: EIO, 12: ENOMEM, 22: EINVAL, 28: ENOSPC, 75: EOVERFLOW,
    95: ENOTSUP, 108: ESHUTDOWN,
    13: EPERM,     # EACCES: the client can do nothing more useful with it than with EPERM
    30: EPERM,     # EROFS
    27: ENOSPC,    # EFBIG
    122: ENOSPC,   # EDQUOT
}


def nbd_error(errno_value: int | None) -> int:
    """The NBD error a client sees for an OSError with this errno; EIO for anything unknown."""
    return _ERRNO_TO_NBD.get(errno_value or 0, EIO)


# -- option payloads -------------------------------------------------------

class BadOption(exception.VmcloudError):
    """An option payload does not parse; the server answers NBD_REP_ERR_INVALID."""


def _take_string(payload: bytes, position: int, length: int) -> tuple[str, int]:
    if length > MAX_NAME or position + length > len(payload):
        raise BadOption('string runs past the end of the option')
    try:
        return payload[position:position + length].decode('utf-8'), position + length
    except UnicodeDecodeError as exc:
        raise BadOption('string is not UTF-8') from exc


def parse_info_request(payload: bytes) -> tuple[str, list[int]]:
    """The export name and requested info types of an NBD_OPT_INFO or NBD_OPT_GO payload.

    :raises: BadOption if the lengths inside the payload do not add up.
    """
    if len(payload) < 6:
        raise BadOption('too short for a name length and an info count')
    (name_length,) = struct.unpack_from('>I', payload)
    name, position = _take_string(payload, 4, name_length)
    if position + 2 > len(payload):
        raise BadOption('no info request count')
    (count,) = struct.unpack_from('>H', payload, position)
    position += 2
    if position + 2 * count != len(payload):
        raise BadOption('info request count does not match the payload length')
    return name, list(struct.unpack_from(f'>{count}H', payload, position))


def parse_meta_context_request(payload: bytes) -> tuple[str, list[str]]:
    """The export name and queries of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.

    :raises: BadOption if the lengths inside the payload do not add up.
    """
    if len(payload) < 8:
        raise BadOption('too short for a name length and a query count')
    (name_length,) = struct.unpack_from('>I', payload)
    name, position = _take_string(payload, 4, name_length)
    if position + 4 > len(payload):
        raise BadOption('no query count')
    (count,) = struct.unpack_from('>I', payload, position)
    position += 4
    queries = []
    for _ in range(count):
        if position + 4 > len(payload):
            raise BadOption('query count exceeds the queries sent')
        (length,) = struct.unpack_from('>I', payload, position)
        query, position = _take_string(payload, position + 4, length)
        queries.append(query)
    if position != len(payload):
        raise BadOption('trailing bytes after the queries')
    return name, queries


def match_meta_contexts(queries: list[str], listing: bool) -> list[str]:
    """The contexts (of the one this server has) that ``queries`` select.

    Listing with no query, or with the namespace query ``base:``, names every
    context; setting selects only exact names.
    """
    if listing and not queries:
        return [META_CONTEXT_BASE_ALLOCATION]
    for query in queries:
        if query == META_CONTEXT_BASE_ALLOCATION or (listing and query == 'base:'):
            return [META_CONTEXT_BASE_ALLOCATION]
    return []
