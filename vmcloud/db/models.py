"""Tables. Schema changes go through an alembic migration in vmcloud/db/migrations."""
import datetime

from sqlalchemy import BigInteger
from sqlalchemy import Float
from sqlalchemy import ForeignKey
from sqlalchemy import Index
from sqlalchemy import PrimaryKeyConstraint
from sqlalchemy import String
from sqlalchemy import UniqueConstraint
from sqlalchemy import text
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Host(Base):
    __tablename__ = 'hosts'

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    # Kept equal to (state == 'up'): the scheduler reads it.
    up: Mapped[bool]
    # up, unknown (silent for service_down_time) or fenced (the operator said it is dead).
    state: Mapped[str] = mapped_column(String(32), default='up')
    # Which node holds the name, and which run of its compute manager: a second node with
    # the same name is refused, a stale manager's reports are ignored.
    node_id: Mapped[str] = mapped_column(String(64), default='')
    incarnation: Mapped[str] = mapped_column(String(36), default='')
    vcpus: Mapped[int]
    memory_mib: Mapped[int]
    disk_bytes_free: Mapped[int] = mapped_column(BigInteger)
    # Where other hosts send the frames of guest networks for this host's guests (its
    # [network] vtep_address); empty: it takes part in no VXLAN (one host only).
    # (Server default: see migration 0003.)
    vtep_address: Mapped[str] = mapped_column(String(64), default='', server_default=text("''"))
    # Load from the last heartbeat: logical CPUs (0: a manager of before, which did not
    # report them; read as its vcpus) and the fraction of them busy over the last
    # heartbeat interval. (Server defaults: see migration 0004.)
    cpus: Mapped[int] = mapped_column(default=0, server_default=text('0'))
    cpu_busy: Mapped[float] = mapped_column(Float, default=0.0, server_default=text('0'))
    # The node's chunk cache from the last heartbeat that told them: the bytes it holds,
    # those it fetched from the warehouse and those it had from peer nodes since its
    # mirror service started. (Server defaults: see migration 0005.)
    cache_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text('0'))
    fetched_bytes: Mapped[int] = mapped_column(BigInteger, default=0,
                                               server_default=text('0'))
    peer_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text('0'))
    # Where the other nodes' mirrors ask this node for chunks (its mirrors' peer chunk
    # server, e.g. http://10.0.0.2:9495); empty: it takes no part in the peer exchange.
    # (Server default: see migration 0006.)
    peer_url: Mapped[str] = mapped_column(String(255), default='', server_default=text("''"))
    last_heartbeat: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    __tablename__ = 'deployments'
    # Pages of the list, newest first, are read along it.
    # Pages newest first; a cloud's and an application's deployments (shown with each
    # cloud and application: without them a page of 100 scans every deployment 100 times).
    __table_args__ = (Index('ix_deployments_created_at_id', 'created_at', 'id'),
                      Index('ix_deployments_cloud', 'cloud'),
                      Index('ix_deployments_application', 'application'))

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    image: Mapped[str] = mapped_column(String(255))  # IMAGE:VERSION
    count: Mapped[int]
    min_count: Mapped[int]
    vcpus: Mapped[int]
    memory_mib: Mapped[int]
    # How instances boot (kernel, initrd, cmdline), as JSON; kept for rebuilds on retry.
    boot: Mapped[str] = mapped_column(String(4000), default='{}')
    # When an instance is ready (the compute host's readiness check), as JSON:
    # {'kind': 'marker' | 'tcp' | 'http' | 'console', ...}; '{}' is the marker.
    health: Mapped[str] = mapped_column(String(2000), default='{}', server_default='{}')
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(2000), default='')
    # The cloud it runs in, and the application it deploys (None: a plain deploy). No
    # foreign keys: a deleted deployment keeps the names of what may be gone since,
    # and adding one would make SQLite copy the table (see migration 0003).
    cloud: Mapped[str] = mapped_column(String(32), default='default',
                                       server_default='default')
    application: Mapped[str | None] = mapped_column(String(64))
    # The service in its guests (port, 'http' | 'tcp'), and the gateway port clients
    # reach it on: held while the deployment lives (None once deleted), unique so that
    # two dispatchers cannot hand out one port twice.
    port: Mapped[int | None]
    protocol: Mapped[str | None] = mapped_column(String(8))
    listener_port: Mapped[int | None] = mapped_column(unique=True, index=True)
    # The API user who deployed it (None: deployed over RPC, or before users existed).
    owner: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class Instance(Base):
    __tablename__ = 'instances'

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey('deployments.id'), index=True)
    image: Mapped[str] = mapped_column(String(255))
    host: Mapped[str | None] = mapped_column(String(255), index=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(2000), default='')
    attempts: Mapped[int] = mapped_column(default=0)
    # Hosts a build already failed on, comma separated: a retry goes elsewhere.
    failed_hosts: Mapped[str] = mapped_column(String(2000), default='')
    boot_seconds: Mapped[float | None]
    fetched_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # A building instance past it ends as a failed build: its host never answered.
    deadline: Mapped[datetime.datetime | None]
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Network(Base):
    """A deployment's layer-2 network: its VXLAN id and subnet, each held by one network
    at a time (the unique constraints keep two dispatchers from handing one out twice).
    The row goes once its deployment is deleted and no instance port is left."""
    __tablename__ = 'networks'

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey('deployments.id'), unique=True)
    vni: Mapped[int] = mapped_column(unique=True)
    cidr: Mapped[str] = mapped_column(String(43), unique=True)
    # active, or deleting: its deployment is deleted, some instance port is still held.
    state: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class Port(Base):
    """An address and MAC of a network: an instance's (kind 'instance', for its whole life,
    wherever it is rebuilt) or a host's DHCP server's (kind 'dhcp', one per host that ran
    an instance of the network, until the network goes)."""
    __tablename__ = 'ports'
    __table_args__ = (
        UniqueConstraint('network_id', 'address'),
        # Instance ports have no host (their instance says where they are); NULLs are
        # distinct, so this holds one DHCP port per network and host.
        UniqueConstraint('network_id', 'host'),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Looked up by the (network_id, address) constraint's index.
    network_id: Mapped[str] = mapped_column(ForeignKey('networks.id'))
    address: Mapped[str] = mapped_column(String(45))
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    instance_id: Mapped[str | None] = mapped_column(ForeignKey('instances.id'), unique=True)
    host: Mapped[str | None] = mapped_column(String(255))


class Snapshot(Base):
    __tablename__ = 'snapshots'
    __table_args__ = (Index('ix_snapshots_created_at_id', 'created_at', 'id'),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey('deployments.id'), index=True)
    state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(2000), default='')
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class SnapshotItem(Base):
    __tablename__ = 'snapshot_items'

    snapshot_id: Mapped[str] = mapped_column(ForeignKey('snapshots.id'), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey('instances.id'), primary_key=True)
    state: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(255), default='')  # IMAGE:VERSION once stored
    reason: Mapped[str] = mapped_column(String(2000), default='')
    pause_ms: Mapped[float | None]
    dirty_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    uploaded_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Epoch seconds as the compute host measured them (time.time()): the cut across hosts
    # is checked by comparing every thaw with every freeze.
    frozen_at: Mapped[float | None]
    thawed_at: Mapped[float | None]
    # An item still freezing or uploading past it ends in error.
    deadline: Mapped[datetime.datetime | None]
    # Deployable: its version is stored and every chunk of it is in the repository or on
    # its owners among the compute nodes (peer replicas). True once available.
    replicated: Mapped[bool] = mapped_column(default=False)
    # Every chunk of its version is in the repository, not only on peers (migration 0007).
    persistent: Mapped[bool] = mapped_column(default=False)


class Cloud(Base):
    """A share of the compute hosts (all of them if it lists none) with a limit on the
    connections its deployments' listeners hold at once."""
    __tablename__ = 'clouds'

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    connection_limit: Mapped[int]
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class CloudHost(Base):
    """A compute host a cloud places on (a host may be in several clouds)."""
    __tablename__ = 'cloud_hosts'
    __table_args__ = (PrimaryKeyConstraint('cloud', 'host'),)

    cloud: Mapped[str] = mapped_column(ForeignKey('clouds.name'))
    host: Mapped[str] = mapped_column(ForeignKey('hosts.name'))


class Application(Base):
    """What to deploy and how it is served: the image and boot of deploy, the service
    port in the guests and its protocol, and a limit on its connections."""
    __tablename__ = 'applications'

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    image: Mapped[str] = mapped_column(String(255))  # IMAGE[:VERSION]
    boot: Mapped[str] = mapped_column(String(4000), default='{}')  # JSON, as deploy's
    health: Mapped[str] = mapped_column(String(2000), default='{}')  # JSON, as deploy's
    vcpus: Mapped[int]
    memory_mib: Mapped[int]
    port: Mapped[int]
    protocol: Mapped[str] = mapped_column(String(8))
    connection_limit: Mapped[int | None]  # None: only its cloud's
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class Gateway(Base):
    """A registered gateway host: the compute hosts flood the networks of exposed
    deployments to its VTEP address."""
    __tablename__ = 'gateways'

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    vtep_address: Mapped[str] = mapped_column(String(64), default='')
    last_seen: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class ApiUser(Base):
    """A user of the REST API: its password as a slow hash (argon2), its role."""
    __tablename__ = 'api_users'

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))  # admin | member
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A token a user logged in for, until it expires or is revoked. Kept by its sha256
    (hex), never the token itself: whoever reads the table cannot log in with it."""
    __tablename__ = 'api_tokens'

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(ForeignKey('api_users.name'), index=True)
    expires_at: Mapped[datetime.datetime] = mapped_column(index=True)
    created_at: Mapped[datetime.datetime] = mapped_column(default=utcnow)
