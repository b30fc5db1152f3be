"""After an upload that left chunks on peers, the compute manager waits for its mirrors to
persist them and tells the dispatcher which items are persistent: ComputeManager._upload
run on a stand-in manager (its mirrors and dispatcher fakes)."""
import functools
import types

from vmcloud import exception
from vmcloud.compute import manager as manager_mod
from tests import base

STORED = {'version': 'vm1-snap:1', 'uploaded_bytes': 4096, 'replicated': True}


class FakeMirrors:
    def __init__(self, results: dict, persisted: dict | Exception):
        self.results = results
        self.persisted = persisted
        self.waited: list[tuple[str, float]] = []

    def upload(self, key: str, targets: dict) -> dict:
        return self.results

    def wait_persistent(self, key: str, timeout: float) -> dict:
        self.waited.append((key, timeout))
        if isinstance(self.persisted, Exception):
            raise self.persisted
        return self.persisted


class FakeDispatcher:
    def __init__(self):
        self.sent: list[tuple] = []

    def __getattr__(self, method: str):
        return lambda *args: self.sent.append((method, *args))


class UploadThenPersistTest(base.TestCase):
    def upload(self, results: dict, persisted: dict | Exception) -> tuple[FakeMirrors, list]:
        self.conf.set_override('snapshot_upload_timeout', 900)
        compute = types.SimpleNamespace(mirrors=FakeMirrors(results, persisted),
                                        dispatcher=FakeDispatcher(), conf=self.conf)
        for name in ('_report', '_wait_persistent'):
            setattr(compute, name,
                    functools.partial(getattr(manager_mod.ComputeManager, name), compute))
        manager_mod.ComputeManager._upload(compute, 'snap1', {n: f'{n}-snap' for n in results},
                                           {n: f'id-{n}' for n in results})
        return compute.mirrors, compute.dispatcher.sent

    def test_the_items_left_on_peers_are_reported_once_persisted(self):
        mirrors, sent = self.upload(
            {'vm1': dict(STORED, persistent=False), 'vm2': dict(STORED, persistent=True),
             'vm3': dict(STORED, persistent=False)},
            {'vm1': True, 'vm3': False})
        self.assertEqual([('snap1', 900)], mirrors.waited)
        self.assertEqual([
            ('snapshot_item_done', 'snap1', 'id-vm1', 'vm1-snap:1', 4096, '', False),
            ('snapshot_item_done', 'snap1', 'id-vm2', 'vm1-snap:1', 4096, '', True),
            ('snapshot_item_done', 'snap1', 'id-vm3', 'vm1-snap:1', 4096, '', False),
            ('snapshot_items_persisted', 'snap1', ['id-vm1'])], sent)

    def test_an_upload_all_in_the_warehouse_waits_for_nothing(self):
        mirrors, sent = self.upload({'vm1': dict(STORED, persistent=True),
                                     'vm2': {'error': 'disk on fire'}}, {})
        self.assertEqual([], mirrors.waited)
        self.assertEqual(['snapshot_item_done'] * 2, [s[0] for s in sent])

    def test_mirrors_that_cannot_say_are_a_warning_and_no_report(self):
        with self.assertLogs('vmcloud.compute.manager', 'WARNING') as logs:
            _mirrors, sent = self.upload(
                {'vm1': dict(STORED, persistent=False)},
                exception.MirrorServiceUnavailable('/run/m.sock', 'gone, on purpose'))
        self.assertEqual(['snapshot_item_done'], [s[0] for s in sent])
        self.assertIn('gone, on purpose', logs.output[0])
