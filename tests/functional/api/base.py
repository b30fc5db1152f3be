"""The running stack the API's functional tests ask over HTTP: a whole cloud in the test's
process (vmcloud.allinone.AllInOne: the dispatcher and two compute managers with the
fake driver, on the fake:// transport), its database SQLite (or PostgreSQL: ``DATABASE``),
and ``vmcloud api`` on it (app.ApiServer, on a free port of 127.0.0.1) with three users.

Started once per test class (setUpClass) and stopped after its last test: a class's
tests share its clouds, images, users and the API's memory (the login throttle), so
each test cleans up what it made. The stack has a configuration of its own
(``self.conf``, ``cls.conf``), not the global one each test's fixture resets.
"""
import os
import shutil
import tempfile
import uuid

import httpx
from oslo_config import cfg
from oslo_messaging._metrics import client as messaging_metrics
from oslo_messaging._tracing import client as messaging_tracing

from tests import base
from vmcloud import allinone
from vmcloud import rpc
from vmcloud.api import app as api_app
from vmcloud.conf import opts as conf_opts

TIMEOUT = 60
# A raw image of varied bytes (no chunk is a hole).
IMAGE_BYTES = bytes(range(256)) * 4096


class ApiStackTest(base.TestCase):
    """``url``; ``as_admin``, ``as_member``, ``as_bob`` (httpx clients with the user's
    token and the API's base URL), ``anonymous`` (no token); ``conf``; ``cloud`` (the
    AllInOne), ``server`` (the ApiServer), ``api_app()``; ``import_image(name)``.

    (Its own helpers are named _stack_*: the tests define login, client... of their own.)
    """

    ADMIN, ADMIN_PASSWORD = 'admin', 'admin-password-1'
    MEMBER, MEMBER_PASSWORD = 'alice', 'alice-password-1'
    BOB, BOB_PASSWORD = 'bob', 'bob-password-1'
    # Imported into the warehouse before the stack starts.
    IMAGE = 'guest'
    HOSTS = 2
    # 'sqlite' (a file in the class's state directory) or 'postgresql' (a database of
    # the class's own on the PostgreSQL tools/start-services.sh runs; making it needs
    # root).
    DATABASE = 'sqlite'

    conf: cfg.ConfigOpts
    url: str
    as_admin: httpx.Client
    as_member: httpx.Client
    as_bob: httpx.Client
    anonymous: httpx.Client

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.tmp_dir = tempfile.mkdtemp(prefix='vmcloud-api-')
        cls.addClassCleanup(shutil.rmtree, cls.tmp_dir, ignore_errors=True)
        cls.conf = cls._stack_conf()
        cls.configure(cls.conf)
        # A fresh fake:// transport for the class (closed after the stack stopped):
        # messages queued for another class's nodes must not reach this one's.
        cls.addClassCleanup(rpc.cleanup)
        cls.cloud = allinone.AllInOne(cls.conf, hosts=cls.HOSTS, driver='fake')
        cls.import_image(cls.IMAGE)
        cls.cloud.start()
        cls.addClassCleanup(cls.cloud.stop)
        cls.server = api_app.ApiServer(cls.conf, port=0).start()
        cls.addClassCleanup(cls.server.stop)
        cls.url = cls.server.url
        identity = cls.server.services.identity
        for name, password, role in ((cls.ADMIN, cls.ADMIN_PASSWORD, 'admin'),
                                     (cls.MEMBER, cls.MEMBER_PASSWORD, 'member'),
                                     (cls.BOB, cls.BOB_PASSWORD, 'member')):
            identity.create_user(name, password, role)
        cls.anonymous = cls._stack_client(None)
        cls.as_admin = cls._stack_client(cls._stack_login(cls.ADMIN, cls.ADMIN_PASSWORD))
        cls.as_member = cls._stack_client(cls._stack_login(cls.MEMBER, cls.MEMBER_PASSWORD))
        cls.as_bob = cls._stack_client(cls._stack_login(cls.BOB, cls.BOB_PASSWORD))

    @classmethod
    def _stack_conf(cls) -> cfg.ConfigOpts:
        """A configuration of every vmcloud option, its state in the class's directory."""
        conf = cfg.ConfigOpts()
        # As vmcloud.conf registers them on the global configuration.
        for module in conf_opts._CONF_MODULES:
            module.register_opts(conf)
        # oslo.messaging reads these of any configuration, but registers them on the
        # global one only (at import).
        conf.register_opts(messaging_metrics.oslo_messaging_metrics,
                           group='oslo_messaging_metrics')
        conf.register_opts(messaging_tracing.oslo_messaging_tracing,
                           group='oslo_messaging_tracing')
        conf([], project='vmcloud', default_config_files=[])
        state_path = os.path.join(cls.tmp_dir, 'state')
        conf.set_override('state_path', state_path)
        conf.set_override('heartbeat_interval', 1)
        # Fake guests on modelled networks: nothing is made on the machine.
        conf.set_override('agent', 'fake', 'network')
        conf.set_override('listen_address', '127.0.0.1', 'api')
        if cls.DATABASE == 'postgresql':
            conf.set_override('connection', cls._postgres_database(), 'database')
        else:
            conf.set_override('connection', f'sqlite:///{state_path}/vmcloud.sqlite',
                              'database')
        return conf

    @classmethod
    def configure(cls, conf: cfg.ConfigOpts) -> None:
        """Override options (``conf.set_override``) before the stack is built."""

    @classmethod
    def _postgres_database(cls) -> str:
        """The URL of a new database, dropped after the class."""
        return base.postgres_database(cls.addClassCleanup, 'vmcloud_api')

    @classmethod
    def _stack_client(cls, token: str | None) -> httpx.Client:
        """A client of the API with ``token`` (None: none), closed after the class."""
        client = httpx.Client(base_url=cls.url, timeout=TIMEOUT,
                              headers={'X-Auth-Token': token} if token else {})
        cls.addClassCleanup(client.close)
        return client

    @classmethod
    def _stack_login(cls, name: str, password: str) -> str:
        """A new token of user ``name``, asked of the API."""
        response = httpx.post(f'{cls.url}/v1/auth/tokens', timeout=TIMEOUT,
                              json={'username': name, 'password': password})
        response.raise_for_status()
        return response.json()['token']['id']

    @classmethod
    def import_image(cls, name: str, data: bytes = IMAGE_BYTES) -> str:
        """A raw image of ``data`` into the warehouse as ``name`` (its next version).

        :returns: ``name``.
        """
        path = os.path.join(cls.tmp_dir, f'{name}-{uuid.uuid4().hex[:8]}.img')
        with open(path, 'wb') as f:
            f.write(data)
        try:
            cls.cloud.warehouse.import_image(path, name, 'raw')
        finally:
            os.unlink(path)
        return name

    def setUp(self):
        super().setUp()
        # The stack's configuration, not the global one the fixture gave (and resets).
        self.conf = type(self).conf

    def api_app(self):
        """The API's FastAPI application (its routes, its document)."""
        return self.server.app
