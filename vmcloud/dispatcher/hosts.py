"""Compute hosts: their heartbeats, their free capacity, and the monitor that marks
silent ones down."""
import collections
import datetime
import logging
import threading
from typing import Protocol

from oslo_config import cfg

from vmcloud import exception
from vmcloud import rpc
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import states
from vmcloud.dispatcher import views
from vmcloud.scheduler.host_state import HostState

LOG = logging.getLogger(__name__)


def host_states(session: db_api.Session) -> list[HostState]:
    """Every host with its capacity from the last heartbeat and its usage from the
    instances that are building or active there (what the scheduler sees)."""
    used = collections.defaultdict(lambda: [0, 0, 0])
    for host, vcpus, memory_mib in db_api.usage_by_host(session, states.RUNNING_STATES):
        totals = used[host]
        totals[0] += vcpus
        totals[1] += memory_mib
        totals[2] += 1
    return [HostState(name=h.name, up=h.up, vcpus_total=h.vcpus,
                      vcpus_used=used[h.name][0], memory_mib_total=h.memory_mib,
                      memory_mib_used=used[h.name][1], disk_bytes_free=h.disk_bytes_free,
                      instance_count=used[h.name][2])
            for h in db_api.hosts(session)]


class HostRegistry:
    """What the dispatcher knows of each compute host, from its heartbeats."""

    def __init__(self, db: db_api.Database):
        self.db = db

    def report_heartbeat(self, host: str, capacity: dict) -> None:
        """:raises: DatabaseError."""
        with self.db.session() as session:
            row = db_api.host_get(session, host)
            if row is None:
                row = db_api.host_create(session, host)
                LOG.info('compute host %s joined', host)
            elif not row.up:
                LOG.info('compute host %s is back', host)
            row.up = True
            row.vcpus = capacity['vcpus']
            row.memory_mib = capacity['memory_mib']
            row.disk_bytes_free = capacity['disk_bytes_free']
            row.last_heartbeat = models.utcnow()

    def list_hosts(self) -> list[dict]:
        """:raises: DatabaseError."""
        with self.db.session() as session:
            usage = {s.name: s for s in host_states(session)}
            return [dict(views.row(h), instances=usage[h.name].instance_count,
                         vcpus_used=usage[h.name].vcpus_used,
                         memory_mib_used=usage[h.name].memory_mib_used)
                    for h in db_api.hosts(session)]


class LostHostHandler(Protocol):
    """What becomes of the instances of a host marked down (the deployer)."""

    def host_lost(self, session: db_api.Session, host: str) -> list[str]:
        """Settle the host's instances in ``session``; :returns: ids of its building
        instances, to be retried elsewhere once ``session`` committed."""

    def build_failed(self, instance_id: str, host: str, reason: str) -> None:
        """Retry a build elsewhere or give it up."""


class HostMonitor:
    """A thread that marks down hosts silent for ``service_down_time`` seconds.

    It outlives every error of a pass (a database away, a bug): a monitor that
    died would leave dead hosts up, and the cloud scheduling onto them, for good.
    """

    def __init__(self, conf: cfg.ConfigOpts, db: db_api.Database, lost: LostHostHandler):
        self.conf = conf
        self.db = db
        self.lost = lost
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name='host-monitor')

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _watch(self) -> None:
        while not self._stopping.wait(self.conf.heartbeat_interval):
            self.check()

    def check(self) -> None:
        """One pass, under its own request id. Never raises: every error is logged."""
        with rpc.request_context():
            try:
                self.mark_dead_hosts()
            except exception.VmcloudError as exc:
                LOG.error('cannot check compute hosts: %s', exc)
            except Exception:  # a bug or an unexpected fault: the next pass may do better
                LOG.exception('checking compute hosts failed')

    def mark_dead_hosts(self) -> list[str]:
        """Mark down the silent hosts, settle their instances, retry their builds.

        :returns: the hosts marked down. :raises: DatabaseError.
        """
        deadline = models.utcnow() - datetime.timedelta(seconds=self.conf.service_down_time)
        retries = []
        with self.db.session() as session:
            dead = db_api.hosts_silent_since(session, deadline)
            for host in dead:
                LOG.warning('compute host %s sent no heartbeat since %s: marked down',
                            host.name, host.last_heartbeat)
                host.up = False
                retries += [(i, host.name) for i in self.lost.host_lost(session, host.name)]
            names = [host.name for host in dead]
        for instance_id, host in retries:
            try:
                self.lost.build_failed(instance_id, host, f'compute host {host} went down')
            except exception.VmcloudError as exc:  # the others may still be retried
                LOG.error('cannot retry instance %s of lost host %s: %s', instance_id, host,
                          exc)
            except Exception:  # a bug: the others may still be retried too
                LOG.exception('cannot retry instance %s of lost host %s', instance_id, host)
        return names
