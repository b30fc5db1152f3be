"""The cloud commands of the CLI: each is one request (one request id for all its calls);
what each asks the dispatcher and prints."""
import argparse
import contextlib
import io
import json

import testtools

from tests import base
from vmcloud import exception
from vmcloud import rpc
from vmcloud.cmd import cli
from vmcloud.cmd import cloud
from vmcloud.dispatcher import rpcapi
from tests.unit.dispatcher import helpers


class RecordingAPI:
    def __init__(self):
        self.request_ids = []

    def _seen(self):
        self.request_ids.append(rpc.current_request_id())

    def deploy(self, *args, health=None):
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
                                  wait=True, timeout=10, progress=False, fmt='json',
                                  health=None, health_timeout=None)
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
            def deploy(self, *args, health=None):
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


SNAPSHOT = {'id': 's1', 'deployment_id': 'd1', 'state': 'uploading', 'reason': '',
            'created_at': '2026-01-01T00:00:00',
            'items': [{'instance_id': 'i1', 'state': 'available', 'version': 'vm-1:1',
                       'pause_ms': 41.5, 'dirty_bytes': 262144, 'uploaded_bytes': 131072,
                       'reason': ''},
                      {'instance_id': 'i2', 'state': 'error', 'version': '', 'pause_ms': None,
                       'dirty_bytes': 0, 'uploaded_bytes': 0, 'reason': 'freeze expired'}]}


class FakeDispatcher:
    """The DispatcherAPI's client methods, answering canned results and recording calls."""

    def __init__(self, test: testtools.TestCase, stderr: io.StringIO):
        self.test = test
        self.stderr = stderr
        self.calls: list[tuple] = []
        self.waits = 'finish'

    def deploy(self, image, count, min_count, vcpus, memory_mib, boot, health=None):
        self.calls.append(('deploy', image, count))
        return {'id': 'd1', 'state': 'building', 'instances': []}

    def deploy_snapshot(self, snapshot_id, boot, allow_partial=False):
        self.calls.append(('deploy_snapshot', snapshot_id, allow_partial))
        return {'id': 'd2', 'state': 'building', 'instances': []}

    def _wait(self, ident: str, result: dict) -> dict:
        # The id is on the terminal before anything is waited for.
        self.test.assertIn(ident, self.stderr.getvalue())
        if self.waits == 'time out':
            raise exception.WaitTimedOut(f'{ident} did not finish in 5 s')
        return result

    def show_deployment(self, deployment_id):
        return {'id': deployment_id, 'state': 'building', 'instances': []}

    def wait_deployment(self, deployment_id, timeout, on_poll=None):
        self.calls.append(('wait_deployment', deployment_id, timeout))
        if self.waits == 'poll':
            # The real waiting, polling show_deployment: a building deployment
            return rpcapi.DispatcherAPI.wait_deployment(self, deployment_id, timeout, on_poll)
        return self._wait(deployment_id, {'id': deployment_id, 'state': 'active',
                                          'instances': []})

    def snapshot(self, deployment_id):
        self.calls.append(('snapshot', deployment_id))
        return dict(SNAPSHOT, state='uploading')

    def wait_snapshot(self, snapshot_id, timeout):
        self.calls.append(('wait_snapshot', snapshot_id, timeout))
        return self._wait(snapshot_id, dict(SNAPSHOT, state='available'))

    def list_snapshots(self, deployment_id=None):
        self.calls.append(('list_snapshots', deployment_id))
        return [{k: v for k, v in SNAPSHOT.items() if k != 'items'}]

    def show_snapshot(self, snapshot_id):
        self.calls.append(('show_snapshot', snapshot_id))
        return dict(SNAPSHOT, state='partial')

    def list_hosts(self):
        self.calls.append(('list_hosts',))
        return [{'name': 'node1', 'up': False, 'state': 'unknown', 'vcpus': 4,
                 'vcpus_used': 2, 'memory_mib': 4096, 'memory_mib_used': 512, 'instances': 2,
                 'last_heartbeat': '2026-01-01T00:00:00'}]

    def fence_host(self, host):
        self.calls.append(('fence_host', host))
        return {'host': host, 'state': 'fenced', 'rebuilt': ['vm-1'], 'failed': []}

    def console(self, instance, max_bytes=65536):
        self.calls.append(('console', instance, max_bytes))
        return {'instance': 'vm-1', 'host': 'node1', 'console': 'VMCLOUD-PHASE boot-done'}


class CommandsTest(base.TestCase):
    """Each command's requests and output, against a FakeDispatcher."""

    def setUp(self):
        super().setUp()
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.api = FakeDispatcher(self, self.stderr)
        self.patch(cloud, '_api', lambda conf: self.api)

    def cli(self, *argv: str) -> int:
        with contextlib.redirect_stdout(self.stdout), contextlib.redirect_stderr(self.stderr):
            return cli.main(list(argv))

    def json_out(self):
        return json.loads(self.stdout.getvalue())

    def test_deploy_wait_says_the_id_before_waiting(self):
        self.assertEqual(0, self.cli('deploy', 'guest', '-n', '2', '--wait', '--timeout', '5',
                                     '-f', 'json'))
        self.assertEqual('active', self.json_out()['state'])
        self.assertEqual([('deploy', 'guest', 2), ('wait_deployment', 'd1', 5.0)],
                         self.api.calls)
        self.assertIn('vmcloud: deployment d1: waiting up to 5 s (`vmcloud show d1` shows it)',
                      self.stderr.getvalue())

    def test_a_timed_out_wait_names_the_id_and_how_to_look(self):
        self.api.waits = 'time out'
        self.assertEqual(1, self.cli('deploy', 'guest', '--wait', '--timeout', '5'))
        self.assertEqual('', self.stdout.getvalue())
        said, error = self.stderr.getvalue().splitlines()
        self.assertIn('d1', said)
        self.assertEqual('vmcloud: error: d1 did not finish in 5 s; it goes on: '
                         '`vmcloud show d1` shows it', error)

    def test_the_real_wait_timing_out_names_the_id_too(self):
        self.api.waits = 'poll'
        self.assertEqual(1, self.cli('deploy', 'guest', '--wait', '--timeout', '0'))
        self.assertEqual('vmcloud: error: deployment d1 did not finish in 0 s; it goes on: '
                         '`vmcloud show d1` shows it', self.stderr.getvalue().splitlines()[-1])

    def test_snapshot_wait_says_the_id_and_times_out_naming_it(self):
        self.assertEqual(0, self.cli('snapshot', 'create', 'd1', '--wait', '--timeout', '5'))
        self.assertIn('vmcloud: snapshot s1: waiting up to 5 s', self.stderr.getvalue())
        self.api.waits = 'time out'
        self.stderr.truncate(0)
        self.assertEqual(1, self.cli('snapshot', 'create', 'd1', '--wait', '--timeout', '5'))
        self.assertIn('vmcloud: error: s1 did not finish in 5 s; it goes on: '
                      '`vmcloud snapshot show s1` shows it', self.stderr.getvalue())

    def test_snapshot_deployment_is_snapshot_create(self):
        # The form scripts used before snapshot had actions.
        self.assertEqual(0, self.cli('snapshot', 'd1', '--wait', '-f', 'json'))
        self.assertEqual([('snapshot', 'd1'), ('wait_snapshot', 's1', 600.0)], self.api.calls)
        self.assertEqual('available', self.json_out()['state'])
        self.assertEqual(0, self.cli('snapshot', '-f', 'json', 'd1'))
        self.assertEqual(('snapshot', 'd1'), self.api.calls[-1])

    def test_snapshot_list(self):
        self.assertEqual(0, self.cli('snapshot', 'list', '-f', 'json'))
        self.assertEqual(0, self.cli('snapshot', 'list', '--deployment', 'd1'))
        self.assertEqual([('list_snapshots', None), ('list_snapshots', 'd1')], self.api.calls)
        table = self.stdout.getvalue()
        for column in cloud.SNAPSHOT_COLUMNS:
            self.assertIn(column, table)
        self.assertIn('s1', table)

    def test_snapshot_show_every_item_field(self):
        # The partial snapshot is shown (exit 0): showing it worked.
        self.assertEqual(0, self.cli('snapshot', 'show', 's1'))
        self.assertEqual([('show_snapshot', 's1')], self.api.calls)
        header, first, second = [line for line in self.stdout.getvalue().splitlines()
                                 if 'i1' in line or 'i2' in line or 'pause_ms' in line]
        for column in ('instance_id', 'state', 'version', 'pause_ms', 'dirty_bytes',
                       'uploaded_bytes', 'reason'):
            self.assertIn(column, header)
        for value in ('available', 'vm-1:1', '41.5', '262144', '131072'):
            self.assertIn(value, first)
        self.assertIn('freeze expired', second)
        self.assertIn('partial', self.stdout.getvalue())

    def test_a_partial_or_failed_snapshot_exits_1(self):
        self.patch(self.api, 'snapshot', lambda d: dict(SNAPSHOT, state='partial'))
        self.assertEqual(1, self.cli('snapshot', 'create', 'd1'))
        self.patch(self.api, 'snapshot', lambda d: dict(SNAPSHOT, state='error'))
        self.assertEqual(1, self.cli('snapshot', 'create', 'd1'))

    def test_deploy_from_a_partial_snapshot_needs_the_flag(self):
        self.assertEqual(0, self.cli('deploy', '--from-snapshot', 's1'))
        self.assertEqual(0, self.cli('deploy', '--from-snapshot', 's1', '--partial'))
        self.assertEqual(0, self.cli('deploy', '--from-snapshot', 's1', '--allow-partial'))
        self.assertEqual([('deploy_snapshot', 's1', False), ('deploy_snapshot', 's1', True),
                          ('deploy_snapshot', 's1', True)], self.api.calls)

    def test_partial_without_a_snapshot_is_refused(self):
        error = self.assertRaises(SystemExit, self.cli, 'deploy', 'guest', '--partial')
        self.assertEqual(2, error.code)
        self.assertIn('--partial goes with --from-snapshot', self.stderr.getvalue())
        self.assertEqual([], self.api.calls)

    def test_host_list_shows_the_state(self):
        self.assertEqual(0, self.cli('host', 'list'))
        header, row = [line for line in self.stdout.getvalue().splitlines()
                       if line.startswith('|')]
        self.assertEqual('state', header.split('|')[2].strip())
        self.assertEqual('unknown', row.split('|')[2].strip())
        # and the older command is the same list
        shown = self.stdout.getvalue()
        self.stdout.truncate(0)
        self.stdout.seek(0)
        self.assertEqual(0, self.cli('hosts'))
        self.assertEqual(shown, self.stdout.getvalue())

    def test_fence_asks_for_yes_and_says_what_it_does(self):
        self.assertEqual(1, self.cli('host', 'fence', 'node1'))
        self.assertEqual([], self.api.calls)
        error = self.stderr.getvalue()
        self.assertEqual(1, len(error.splitlines()), error)
        for words in ('fencing node1 declares it dead', 'rebuilt on other hosts',
                      'add --yes'):
            self.assertIn(words, error)
        self.assertEqual(0, self.cli('host', 'fence', 'node1', '--yes', '-f', 'json'))
        self.assertEqual([('fence_host', 'node1')], self.api.calls)
        self.assertEqual(['vm-1'], self.json_out()['rebuilt'])

    def test_console_prints_the_text(self):
        self.assertEqual(0, self.cli('console', 'vm-1'))
        self.assertEqual(0, self.cli('console', 'vm-1', '--bytes', '100'))
        self.assertEqual([('console', 'vm-1', 65536), ('console', 'vm-1', 100)],
                         self.api.calls)
        self.assertEqual('VMCLOUD-PHASE boot-done\n' * 2, self.stdout.getvalue())
        error = self.assertRaises(SystemExit, self.cli, 'console', 'vm-1', '--bytes', '0')
        self.assertEqual(2, error.code)


class AgainstACloudTest(helpers.CloudTestCase):
    """The commands against the all-in-one cloud (fake driver, fake://)."""

    def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def json_of(self, *argv: str):
        rc, out, err = self.cli(*argv, '-f', 'json')
        self.assertEqual(0, rc, err)
        return json.loads(out)

    def test_deploy_console_snapshot_and_fence(self):
        rc, out, err = self.cli('deploy', 'guest', '-n', '2', '--wait', '-f', 'json')
        self.assertEqual(0, rc, err)
        deployment = json.loads(out)
        self.assertEqual('active', deployment['state'])
        self.assertIn(f'vmcloud: deployment {deployment["id"]}: waiting', err)
        hosts = self.json_of('host', 'list')
        self.assertEqual({'node1': 'up', 'node2': 'up'}, {h['name']: h['state'] for h in hosts})

        instance = deployment['instances'][0]
        rc, out, err = self.cli('console', instance['name'])
        self.assertEqual(0, rc, err)
        self.assertIn('VMCLOUD-PHASE boot-done\n', out)
        tail = self.json_of('console', instance['id'], '--bytes', '10')
        self.assertEqual((instance['name'], instance['host']), (tail['instance'], tail['host']))
        self.assertLessEqual(len(tail['console']), 10)

        rc, out, err = self.cli('snapshot', deployment['id'], '--wait', '--timeout', '30',
                                '-f', 'json')
        snapshot = json.loads(out)
        self.assertEqual(snapshot['state'] == 'available', rc == 0, err)
        self.assertEqual(2, len(snapshot['items']))
        listed = self.json_of('snapshot', 'list', '--deployment', deployment['id'])
        self.assertEqual([snapshot['id']], [s['id'] for s in listed])
        shown = self.json_of('snapshot', 'show', snapshot['id'])

        def settled(doc: dict) -> dict:
            # Persisting goes on in the background after the wait: it may end in between.
            doc = {k: v for k, v in doc.items() if k != 'persistent'}
            doc['items'] = [{k: v for k, v in i.items() if k != 'persistent'}
                            for i in doc['items']]
            return doc
        self.assertEqual(settled(snapshot), settled(shown))

        fenced = self.json_of('host', 'fence', 'node1', '--yes')
        self.assertEqual(('node1', 'fenced'), (fenced['host'], fenced['state']))
        self.assertEqual('fenced', {h['name']: h['state'] for h in self.json_of('hosts')}['node1'])
