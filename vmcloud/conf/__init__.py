"""Configuration options, one module per option group.

Importing this package registers every group on the global ``cfg.CONF``.
"""
from oslo_config import cfg

from vmcloud.conf import api
from vmcloud.conf import compute
from vmcloud.conf import gateway
from vmcloud.conf import mirror
from vmcloud.conf import network
from vmcloud.conf import paths
from vmcloud.conf import replay
from vmcloud.conf import scheduler
from vmcloud.conf import service
from vmcloud.conf import storage
from vmcloud.conf import warehouse

CONF = cfg.CONF

api.register_opts(CONF)
compute.register_opts(CONF)
gateway.register_opts(CONF)
mirror.register_opts(CONF)
network.register_opts(CONF)
paths.register_opts(CONF)
replay.register_opts(CONF)
scheduler.register_opts(CONF)
service.register_opts(CONF)
storage.register_opts(CONF)
warehouse.register_opts(CONF)
