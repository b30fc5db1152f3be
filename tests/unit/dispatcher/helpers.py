"""A whole cloud in the test's process: fake driver, fake:// transport, SQLite."""
import logging
import os

from oslo_messaging.notify import _impl_test as notifications_test_driver
from oslo_messaging.notify import notifier

from vmcloud import allinone
from vmcloud import polling
from vmcloud import rpc
from tests import base

TIMEOUT = 60


def write_image(directory: str, size: int = 1024 * 1024) -> str:
    """A raw image of ``size`` bytes of varied content (no chunk is a hole)."""
    path = os.path.join(directory, 'small.img')
    with open(path, 'wb') as f:
        f.write(bytes(range(256)) * (size // 256))
    return path


def use_postgres(test: base.TestCase, prefix: str) -> None:
    """Point ``test``'s [database] at a PostgreSQL database of its own, dropped after it."""
    test.conf.set_override('connection', base.postgres_database(test.addCleanup, prefix),
                           'database')


class CloudTestCase(base.TestCase):
    """A dispatcher and ``HOSTS`` compute managers with the fake driver, started."""

    HOSTS = 2

    def setUp(self):
        super().setUp()
        # A fresh fake:// transport per test: messages queued for a stopped node must
        # not reach the next test's node of the same name.
        self.addCleanup(rpc.cleanup)
        self.conf.register_opts(notifier._notifier_opts, group='oslo_messaging_notifications')
        self.conf.set_override('driver', ['test'], 'oslo_messaging_notifications')
        notifications_test_driver.reset()
        self.conf.set_override('heartbeat_interval', 1)
        self.conf.set_override('max_instances_per_host', 3, 'scheduler')
        # Fake guests on modelled networks: nothing is made on the machine.
        self.conf.set_override('agent', 'fake', 'network')
        self.configure()
        self.cloud = allinone.AllInOne(self.conf, hosts=self.HOSTS, driver='fake')
        self.cloud.warehouse.import_image(write_image(self.tmp), 'guest')
        self.cloud.start()
        self.addCleanup(self.cloud.stop)
        self.api = self.cloud.api

    def configure(self) -> None:
        """Override options before the cloud is built."""

    def deploy_and_wait(self, **kwargs) -> dict:
        deployment = self.api.deploy('guest', **kwargs)
        return self.api.wait_deployment(deployment['id'], TIMEOUT)

    def wait_deployment_state(self, deployment_id: str, state: str) -> dict:
        return polling.wait(lambda: self.api.show_deployment(deployment_id),
                            lambda d: d['state'] == state, TIMEOUT,
                            f'deployment {deployment_id} {state}', interval=0.05)

    def record_request_ids(self) -> 'RequestIds':
        """From now on until the test ends, every record of the vmcloud loggers at INFO
        and above, with the request id current where it was written."""
        records = RequestIds()
        logger = logging.getLogger('vmcloud')
        logger.addHandler(records)
        self.addCleanup(logger.removeHandler, records)
        self.addCleanup(logger.setLevel, logger.level)
        logger.setLevel(logging.INFO)
        return records

    def notifications(self) -> list[str]:
        return [n[1]['event_type'] for n in notifications_test_driver.NOTIFICATIONS]


class RequestIds(logging.Handler):
    """Every record of the vmcloud loggers with the request id current where it was
    written: (logger name, request id, message)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str | None, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, rpc.current_request_id(), record.getMessage()))
