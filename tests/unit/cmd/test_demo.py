"""``vmcloud demo``'s figures: the bytes its steps fetched, from the repository and from
the other nodes apart (fake driver: the real guests' run is tools/demo.sh's)."""
import argparse
import contextlib
import io

from vmcloud import allinone
from vmcloud.cmd import demo as demo_mod
from tests import base
from tests.unit.dispatcher import helpers


class DemoFiguresTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(allinone.rpc.cleanup)
        self.conf.set_override('agent', 'fake', 'network')
        self.conf.set_override('heartbeat_interval', 600)
        args = argparse.Namespace(hosts=2, driver='fake', count=2, timeout=30)
        self.demo = demo_mod._Demo(self.conf, args)
        self.cloud = self.demo.cloud
        self.cloud.warehouse.import_image(helpers.write_image(self.tmp), 'guest')
        self.cloud.start()
        self.addCleanup(self.cloud.stop)

    def test_a_step_reports_repository_and_peer_bytes_apart(self):
        warehouse = self.cloud.warehouse
        chunk_ids = sorted(warehouse.lookup('guest').data_chunk_ids())
        image_bytes = sum(len(warehouse.read_chunk(c)) for c in chunk_ids)
        before = self.cloud.fetched()
        for compute in self.cloud.computes:  # both nodes read the whole image
            for chunk_id in chunk_ids:
                compute.mirrors.cache.read_chunk(chunk_id)
        facts = self.demo.fetched_since(before)
        self.assertEqual({'repository_bytes': image_bytes, 'peer_bytes': image_bytes}, facts)
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            self.demo.step('read twice', 0.0, **facts, stored_bytes='')
            self.demo.report()
        header = [line for line in printed.getvalue().splitlines() if 'step' in line][0]
        self.assertEqual(['step', 'seconds', 'repository_bytes', 'peer_bytes', 'stored_bytes',
                          'dirty_bytes', 'image_bytes'],
                         [cell.strip() for cell in header.strip('|').split('|')])
        self.assertIn(f'| {image_bytes} ', printed.getvalue())
