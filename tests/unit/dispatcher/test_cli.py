"""Each cloud command of the CLI is one request: one request id for all its calls."""
import argparse

import testtools

from vmcloud import rpc
from vmcloud.cmd import cli
from vmcloud.cmd import cloud


class RecordingAPI:
    def __init__(self):
        self.request_ids = []

    def _seen(self):
        self.request_ids.append(rpc.current_request_id())

    def deploy(self, *args):
        self._seen()
        return {'id': 'd1', 'state': 'building', 'instances': []}

    def wait_deployment(self, deployment_id, timeout, on_poll=None):
        for _ in range(3):
            self._seen()
        return {'id': 'd1', 'state': 'active', 'instances': []}


class OneRequestTest(testtools.TestCase):
    def test_deploy_and_its_waiting_share_one_request_id(self):
        api = RecordingAPI()
        self.patch(cloud, '_api', lambda conf: api)
        self.patch(cloud, '_show', lambda deployment, fmt: None)
        args = argparse.Namespace(from_snapshot=None, image='guest', count=1, min_count=None,
                                  vcpus=1, memory=256, kernel=None, initrd=None, cmdline=None,
                                  wait=True, timeout=10, progress=False, fmt='json')
        self.assertEqual(0, cloud.do_deploy(None, args))
        self.assertEqual(4, len(api.request_ids))
        self.assertEqual(1, len(set(api.request_ids)), api.request_ids)
        self.assertTrue(api.request_ids[0].startswith('req-'))
        self.assertIsNone(rpc.current_request_id())


class BootArtifactArgumentsTest(testtools.TestCase):
    def test_kernel_and_initrd_go_to_the_dispatcher_as_given(self):
        # An image name or an absolute path: the dispatcher tells them apart and pins.
        calls = []

        class API(RecordingAPI):
            def deploy(self, *args):
                calls.append(args)
                return super().deploy(*args)
        self.patch(cloud, '_api', lambda conf: API())
        self.patch(cloud, '_show', lambda deployment, fmt: None)
        parser, _ = cli.build_parser(['deploy'])
        args = parser.parse_args(['deploy', 'guest', '--kernel', 'vmlinuz:2',
                                  '--initrd', '/boot/initrd.img', '--cmdline', 'quiet'])
        self.assertEqual(0, cloud.do_deploy(None, args))
        (_, _, _, _, _, boot), = calls
        self.assertEqual({'kernel': 'vmlinuz:2', 'initrd': '/boot/initrd.img',
                          'cmdline': 'quiet'}, boot)
