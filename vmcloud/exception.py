"""The error hierarchy. Every error vmcloud raises on purpose is a VmcloudError.

Errors keep their cause: raise them with ``raise X(...) from exc`` so that the
original exception stays reachable as ``__cause__``.
"""


class VmcloudError(Exception):
    """Root of every error raised by vmcloud."""


class ConfigError(VmcloudError):
    """The configuration is invalid or names something that does not exist."""


class PluginNotFound(ConfigError):
    """A configured plugin name is not installed."""

    def __init__(self, namespace: str, name: str, available: list[str]):
        self.namespace = namespace
        self.name = name
        self.available = available
        super().__init__(
            f"unknown {namespace} plugin {name!r}; installed: {', '.join(available) or 'none'}")


# -- storage ---------------------------------------------------------------

class StorageError(VmcloudError):
    """Base class of warehouse errors."""


class ImageNotFound(StorageError):
    def __init__(self, image: str, version: int | None = None):
        self.image = image
        self.version = version
        what = f"{image}:{version}" if version is not None else image
        super().__init__(f"image {what} not found")


class ImageExists(StorageError):
    def __init__(self, image: str):
        self.image = image
        super().__init__(f"image {image} already exists")


class VersionExists(StorageError):
    """A backend was asked to create a manifest for a version that is already stored."""

    def __init__(self, image: str, version: int):
        self.image = image
        self.version = version
        super().__init__(f"image {image}:{version} already exists")


class ImageInUse(StorageError):
    """The image or version has dependent snapshots and cannot be deleted."""

    def __init__(self, what: str, dependents: list[str]):
        self.dependents = dependents
        super().__init__(
            f"{what} has dependent snapshots: {', '.join(dependents)}; delete them first")


class ChunkNotFound(StorageError):
    def __init__(self, chunk_id: str):
        self.chunk_id = chunk_id
        super().__init__(f"chunk {chunk_id} is missing from the warehouse")


class CorruptChunk(StorageError):
    def __init__(self, chunk_id: str, actual: str):
        self.chunk_id = chunk_id
        super().__init__(f'chunk {chunk_id} is corrupt: its content hashes to {actual}')


class CorruptManifest(StorageError):
    """A stored manifest cannot be parsed or fails its checksum."""


class UnsafeImage(StorageError):
    """An image file was refused by inspection before it was imported."""


class InvalidRange(StorageError):
    """A byte range lies outside an image version."""


class WarehouseBusy(StorageError):
    """An operation needs the warehouse to itself and could not get it in time."""


class ScratchSpaceExhausted(StorageError):
    """An operation would need more scratch or destination space than is free."""


class InvalidName(StorageError):
    """An image name or version reference is not of the allowed form."""


class LeaseLost(StorageError):
    """A lock was lost while held (it expired, was broken or taken by another holder,
    or the warehouse service forgot its lease): it is not held any more."""


class ImageFileNotFound(StorageError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(f'image file {path} does not exist')


# -- node state ------------------------------------------------------------

class StateLocked(VmcloudError):
    """A node's state (chunk cache, NBD socket, a mirror) is owned by another process."""

    def __init__(self, what: str, path: str, holder: str):
        self.what = what
        self.path = path
        self.holder = holder
        super().__init__(f'{what} at {path} is in use by {holder}; one process owns it at a time')


# -- hypervisor drivers ----------------------------------------------------

class DriverError(VmcloudError):
    """Base class of hypervisor driver errors."""


class HypervisorUnavailable(DriverError):
    """The hypervisor (qemu binary, libvirtd) is missing or not answering."""


class InstanceNotFound(DriverError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'instance {name} not found')


class InstanceExists(DriverError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'instance {name} already exists')


class DiskNotFound(DriverError):
    """The disk to boot from does not exist or its server cannot be reached."""


class SpawnFailed(DriverError):
    """The hypervisor refused to start the instance."""


class GuestTimeout(DriverError):
    """A guest did not reach an expected point in time."""


class InvalidSpec(DriverError):
    """A driver cannot run an instance as specified (a missing kernel, an unsupported disk
    URI or format, memory or vCPUs out of range); nothing was started."""

    def __init__(self, name: str, problem: str):
        self.name = name
        self.problem = problem
        super().__init__(f'instance {name}: {problem}')


class NotSupported(DriverError):
    """The driver cannot do this at all (its ``capabilities`` say so); nothing was changed."""

    def __init__(self, driver: str, operation: str):
        self.driver = driver
        self.operation = operation
        super().__init__(f'the {driver} driver cannot {operation}')


# -- mirrors ---------------------------------------------------------------

class MirrorError(VmcloudError):
    """Base class of mirror errors."""


class MirrorNotFound(MirrorError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'mirror {name} not found')


class MirrorExists(MirrorError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'mirror {name} already exists')


class CorruptMirrorState(MirrorError):
    """A mirror's persistent dirty map cannot be trusted."""


class FetchFailed(MirrorError):
    """A chunk could not be fetched from the warehouse, even after retries."""

    def __init__(self, chunk_id: str, attempts: int, cause: Exception):
        self.chunk_id = chunk_id
        super().__init__(f'cannot fetch chunk {chunk_id} after {attempts} attempts: {cause}')


class PeerError(MirrorError):
    """Another node's peer chunk server did not serve a request: it could not be reached,
    was silent too long, answered an error, or a short or malformed answer. ``chunk_id``
    is None for a request about no chunk (its stats)."""

    def __init__(self, peer: str, chunk_id: str | None, reason: str):
        self.peer = peer
        self.chunk_id = chunk_id
        self.reason = reason
        what = f'chunk {chunk_id}' if chunk_id else 'its stats'
        super().__init__(f'peer {peer} did not serve {what}: {reason}')


class ReplicaBudgetFull(MirrorError):
    """A node cannot keep one more chunk not yet in the repository: its unpersisted
    replicas fill ``[mirror] replica_size`` (``budget`` bytes), or its cache holds
    nothing it may evict for it."""

    def __init__(self, chunk_id: str, held: int, budget: int):
        self.chunk_id = chunk_id
        self.held = held
        self.budget = budget
        super().__init__(f'cannot keep chunk {chunk_id} as a replica: {held} bytes of '
                         f'replicas not yet in the repository are held, the budget is '
                         f'{budget} ([mirror] replica_size)')


# -- NBD server ------------------------------------------------------------

class NbdError(VmcloudError):
    """The NBD server cannot do what was asked: listen, serve an export, or run at all."""


# -- scheduler -------------------------------------------------------------

class NoValidHost(VmcloudError):
    """Fewer instances fit on the hosts than the request needs at least."""

    def __init__(self, requested: int, required: int, placed: int, hosts: int,
                 filter_name: str | None = None, eliminated: int = 0):
        self.requested = requested
        self.required = required
        self.placed = placed
        self.hosts = hosts
        self.filter_name = filter_name
        self.eliminated = eliminated
        asked = f'{requested} instance' + ('' if requested == 1 else 's')
        if required != requested:
            asked += f' (at least {required})'
        if filter_name is None:
            why = f'{hosts} candidate host' + ('' if hosts == 1 else 's')
        else:
            why = (f'filter {filter_name!r} eliminated the most hosts: '
                   f'{eliminated} of {hosts}')
        super().__init__(f'no valid host: asked for {asked}, only {placed} fit; {why}')


# -- services --------------------------------------------------------------

class DatabaseError(VmcloudError):
    """The database cannot be reached or refused the work."""


class MessagingError(VmcloudError):
    """The message bus (RabbitMQ) cannot be reached, or a service did not answer."""


class DeploymentNotFound(VmcloudError):
    def __init__(self, deployment_id: str):
        self.deployment_id = deployment_id
        super().__init__(f'deployment {deployment_id} not found')


class HostNotFound(VmcloudError):
    def __init__(self, host: str):
        self.host = host
        super().__init__(f'compute host {host} is unknown')


class InvalidRequest(VmcloudError):
    """A request to the dispatcher makes no sense (a count below 1, min above max...)."""


class MarkerNotFound(InvalidRequest):
    """A page was asked for after a marker (the key of the last item of the previous
    page) that names nothing in the collection."""

    def __init__(self, marker: str):
        self.marker = marker
        super().__init__(f'marker {marker} not found')


class NameInUse(InvalidRequest):
    """A cloud or application (``kind``) of this name exists already."""

    def __init__(self, kind: str, name: str):
        self.kind = kind
        self.name = name
        super().__init__(f'{kind} {name} exists already')


class InUse(InvalidRequest):
    """A cloud or application (``kind``) cannot be deleted: ``reason`` says why (the
    default cloud, deployments of it that are not deleted)."""

    def __init__(self, kind: str, name: str, reason: str):
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f'{kind} {name} {reason}')


class SnapshotNotFound(InvalidRequest):
    def __init__(self, snapshot_id: str):
        self.snapshot_id = snapshot_id
        super().__init__(f'snapshot {snapshot_id} not found')


class AttachmentTooLarge(StorageError):
    """An image attachment is larger than a backend keeps (backend.MAX_ATTACHMENT_BYTES)."""


class BootArtifactError(VmcloudError):
    """A boot artifact (a kernel or initrd image) cannot be had on this compute node."""


class MessageBusUnreachable(MessagingError):
    """No host of the message bus accepts a connection (refused, unresolvable, timed out):
    it may come up, so a service starting retries for a while."""


class MessageBusRefused(MessagingError):
    """The message bus answered but refused us (the login, the virtual host, the TLS
    handshake): retrying the same configuration cannot help."""


class HostNameInUse(ConfigError):
    """Another node, still alive, holds this compute host name: two managers must not
    take turns answering for one host ([DEFAULT] host must be unique in the cloud)."""

    def __init__(self, host: str, owner: str):
        self.host = host
        self.owner = owner
        super().__init__(f'compute host name {host} is in use by node {owner}, which is '
                         f'alive; set a unique [DEFAULT] host')


class MirrorServiceUnavailable(MirrorError):
    """The node's mirror service does not answer on its control socket (absent, refusing,
    or too slow for the call's deadline)."""

    def __init__(self, socket: str, reason: str):
        self.socket = socket
        self.reason = reason
        super().__init__(f'mirror service at {socket} is unavailable: {reason}')


class MirrorRequestInvalid(MirrorError):
    """The mirror service cannot parse a request: not JSON, too large, an unknown
    method or arguments the method does not take."""


class ImageHeld(ImageInUse):
    """A version to delete is held (Warehouse.hold) by a user: a mirror serving a
    running guest, an unfinished snapshot. ``holders`` names them; ``version`` is None
    when the whole image was to be deleted."""

    def __init__(self, image: str, version: int | None, holders: list[str]):
        self.image = image
        self.version = version
        self.holders = holders
        self.dependents = holders
        what = image if version is None else f'{image}:{version}'
        StorageError.__init__(
            self, f"image {what} is in use by {', '.join(holders)}; nothing was deleted "
                  "(--force deletes it anyway)")


class DispatcherUnavailable(MessagingError):
    """No dispatcher answered a ping on the bus within ``timeout`` s: the CLI stops
    there, instead of waiting out a whole RPC call for each request."""

    def __init__(self, url: str, topic: str, timeout: float):
        self.url = url
        self.topic = topic
        self.timeout = timeout
        super().__init__(f'the dispatcher did not answer within {timeout:g} s on {url} '
                         f'(topic {topic}): is `vmcloud dispatcher` running?')


class WaitTimedOut(VmcloudError):
    """What was waited for did not finish in time; it may still be going on."""


# -- guest networks --------------------------------------------------------

class NetworkError(VmcloudError):
    """A guest network cannot be set up, changed, torn down or reached on this host: the
    message names the command or the address that failed."""


class NetworkNotFound(NetworkError):
    def __init__(self, network_id: str):
        self.network_id = network_id
        super().__init__(f'network {network_id} is not present on this host')


class AddressPoolExhausted(NetworkError):
    """No subnet, address or VNI is left in a pool; the message names the pool."""


# -- clouds, applications and the gateway ----------------------------------

class CloudNotFound(InvalidRequest):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'cloud {name} not found')


class ApplicationNotFound(InvalidRequest):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f'application {name} not found')


class ListenerPortsExhausted(InvalidRequest):
    """Every port of the gateway's listener range for the protocol is held by a live
    deployment."""

    def __init__(self, protocol: str, port_range: str):
        self.protocol = protocol
        self.port_range = port_range
        super().__init__(f'no {protocol} listener port is free in the gateway\'s range '
                         f'{port_range}: delete a deployment or widen [gateway] '
                         f'{"listener_ports" if protocol == "http" else "tcp_listener_ports"}')


class GatewayError(VmcloudError):
    """The gateway cannot do what was asked: the message names what failed."""


class GatewayUnavailable(GatewayError):
    """No registered gateway answered."""

    def __init__(self, gateways: list[str], timeout: float):
        self.gateways = gateways
        self.timeout = timeout
        super().__init__(
            f'no gateway answered within {timeout:g} s (registered: '
            f'{", ".join(gateways) or "none"}): is `vmcloud gateway` running?')


class HAProxyError(GatewayError):
    """HAProxy refused a runtime command, did not answer, or did not start."""

    def __init__(self, command: str, answer: str):
        self.command = command
        self.answer = answer
        super().__init__(f'HAProxy: {command!r} failed: {answer.strip() or "no answer"}')


class BackendSlotsExhausted(GatewayError):
    def __init__(self, protocol: str, slots: int):
        self.protocol = protocol
        self.slots = slots
        super().__init__(f'the gateway serves {slots} {protocol} deployments already, '
                         f'all its [gateway] backend_slots')


# -- the REST API ----------------------------------------------------------

class Unauthorized(VmcloudError):
    """No valid credentials: no token, an unknown or expired one, a wrong password."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class Forbidden(VmcloudError):
    """The caller is known, but its role does not allow what it asked."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


class LoginThrottled(VmcloudError):
    """Too many failed logins of late: the next attempt is taken in ``retry_after`` s."""

    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f'too many failed logins: try again in {retry_after} s')


class UserNotFound(InvalidRequest):
    """No user of the REST API of that name."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f'user {name} not found')


class ApiError(VmcloudError):
    """The REST API answered an error no other class stands for: its HTTP ``status``,
    its message, and the request id to find it in the API's log."""

    def __init__(self, status: int, message: str, request_id: str = ''):
        self.status = status
        self.message = message
        self.request_id = request_id
        super().__init__(message)
