"""Run ``vmcloud image gc``'s work in a process of its own, then print its report as JSON.

Run as ``python -m tests.functional.storage.gc_child CONFIG``.
"""
import dataclasses
import json
import sys

from oslo_config import cfg

import vmcloud.conf  # noqa: F401 - registers options
from vmcloud.storage import warehouse


def main(argv: list[str]) -> None:
    cfg.CONF(['--config-file', argv[0]], project='vmcloud')
    report = warehouse.Warehouse(cfg.CONF).gc()
    print(json.dumps(dataclasses.asdict(report)))


if __name__ == '__main__':
    main(sys.argv[1:])
