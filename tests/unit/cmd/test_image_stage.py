"""``vmcloud image stage`` and ``image import --stage``: the peers asked of the dispatcher
(the real client over fake://, to a fake dispatcher), the chunks asked of the peers (a
recording stand-in), what is printed and the exit status."""
import contextlib
import io
import json
import os

from tests import base
from tests.unit.mirror import test_staging
from vmcloud import rpc
from vmcloud.cmd import cli
from vmcloud.cmd import image
from vmcloud.dispatcher import rpcapi
from vmcloud.mirror import ownership
from vmcloud.mirror import profile as profile_mod
from vmcloud.mirror import staging
from vmcloud.storage import warehouse as warehouse_mod

CHUNK = test_staging.CHUNK
CHUNKS = 20


class FakeDispatcher:
    def __init__(self, hosts: list[dict]):
        self.hosts = hosts

    @rpc.expose
    def ping(self, ctxt: dict) -> dict:
        return {'host': 'here'}

    @rpc.expose
    def list_hosts(self, ctxt: dict) -> list[dict]:
        return self.hosts


def host(name: str, state: str = 'up', peer: bool = True) -> dict:
    return {'name': name, 'state': state, 'up': state == 'up',
            'peer_url': f'http://{name}.lan:9495' if peer else ''}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class StageCommandTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.addCleanup(rpc.cleanup)
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('cli_timeout', 5)
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.conf.set_override('peer_token', 'cluster-secret', 'mirror')
        self.conf.set_override('peer_timeout', 0.5, 'mirror')
        self.dispatcher = FakeDispatcher([host('node1'), host('node2'), host('node3'),
                                          host('node4', 'unknown'), host('node5', peer=False)])
        server = rpc.server(self.conf, rpcapi.TOPIC, 'dispatcher', [self.dispatcher])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        self.peers = test_staging.FakePeers()
        self.clients = []

        def peer_client(conf):
            self.clients.append((conf.mirror.peer_token, conf.mirror.peer_timeout))
            return self.peers
        self.patch(image, '_peer_client', peer_client)
        self.raw = os.path.join(self.tmp, 'disk.raw')
        with open(self.raw, 'wb') as f:
            f.write(b''.join(test_staging.chunk_bytes(i) for i in range(CHUNKS)))
        self.up = {h['name']: h['peer_url'] for h in self.dispatcher.hosts[:3]}

    def cli(self, *argv: str, stderr: io.StringIO | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), stderr or io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def imported(self) -> warehouse_mod.Warehouse:
        warehouse = warehouse_mod.Warehouse(self.conf)
        warehouse.import_image(self.raw, 'disk', 'raw')
        return warehouse

    def test_stage_asks_each_owner_of_each_chunk_among_the_hosts_up(self):
        warehouse = self.imported()
        rc, out, err = self.cli('image', 'stage', 'disk', '-f', 'json', '--threads', '3')
        self.assertEqual(0, rc, err)
        record = json.loads(out)
        self.assertEqual({'image': 'disk:1', 'source': staging.STORED_CHUNKS,
                          'chunks': CHUNKS, 'bytes': CHUNKS * CHUNK, 'peers': 3,
                          'replicas': 2, 'copies': 2 * CHUNKS, 'short_chunks': 0,
                          'failed_peers': ''},
                         {k: v for k, v in record.items() if k != 'seconds'})
        expected = set()
        for chunk_id in warehouse.lookup('disk').chunks:
            expected |= {(self.up[h], chunk_id) for h in ownership.owners(chunk_id, self.up, 2)}
        self.assertEqual(expected, set(self.peers.requests))
        self.assertEqual(2 * CHUNKS, len(self.peers.requests))
        # The cluster's token and timeout.
        self.assertEqual([('cluster-secret', 0.5)], self.clients)
        summary, = [line for line in err.splitlines() if line.startswith('vmcloud: staged')]
        self.assertTrue(summary.startswith(f'vmcloud: staged {CHUNKS} chunks (0.1 MiB, stored '
                                           'chunks) of disk:1 on 3 peers, 2 owners a chunk, '
                                           'in '), summary)
        self.assertTrue(summary.endswith(' s'), summary)

    def test_the_boot_profile_and_the_replicas_the_nodes_tell(self):
        warehouse = self.imported()
        manifest = warehouse.lookup('disk')
        profile_mod.ProfileStore(warehouse).save(manifest, {profile_mod.BOOT: [4, 2]})
        # The CLI's own configuration is not the nodes': their owners are what count.
        self.conf.set_override('peer_replicas', 3, 'mirror')
        for url in self.up.values():
            self.peers.replicas[url] = 1
        rc, out, err = self.cli('image', 'stage', 'disk:1', '-f', 'json', '--threads', '1')
        self.assertEqual(0, rc, err)
        record = json.loads(out)
        self.assertEqual((staging.BOOT_PROFILE, 2, 1, 2),
                         (record['source'], record['chunks'], record['replicas'],
                          record['copies']))
        self.assertEqual([(self.up[ownership.owners(manifest.chunks[i], self.up, 1)[0]],
                           manifest.chunks[i]) for i in (4, 2)], self.peers.requests)

    def test_nodes_that_disagree_on_the_replicas_are_named_and_nothing_is_staged(self):
        self.imported()
        self.peers.replicas[self.up['node2']] = 3
        rc, out, err = self.cli('image', 'stage', 'disk')
        self.assertEqual((1, ''), (rc, out))
        self.assertEqual(['vmcloud: error: cannot stage: the peers disagree on the owners of a '
                          'chunk ([mirror] peer_replicas): node1 has 2, node2 has 3, node3 has '
                          '2; give the nodes one value'], err.splitlines())
        self.assertEqual([], self.peers.requests)
        # Before a long import, too.
        rc, out, err = self.cli('image', 'import', self.raw, 'other', '--stage')
        self.assertEqual((1, ''), (rc, out))
        self.assertIn('the peers disagree', err)
        self.assertEqual(['disk'], warehouse_mod.Warehouse(self.conf).images())

    def test_progress_off_a_terminal_is_a_line_at_each_tenth(self):
        self.imported()
        rc, _, err = self.cli('image', 'stage', 'disk', '--threads', '1')
        self.assertEqual(0, rc, err)
        lines = [line for line in err.splitlines() if line.startswith('staging disk:1: ')]
        self.assertEqual([f'staging disk:1: {p}% {p // 5}/{CHUNKS} chunks' for p in
                          range(10, 101, 10)],
                         [line.partition(' chunks')[0] + ' chunks' for line in lines])
        self.assertTrue(lines[-1].endswith('0.1/0.1 MiB'), lines[-1])
        self.assertNotIn('\r', err)

    def test_progress_on_a_terminal_is_one_line_redrawn(self):
        self.imported()
        rc, _, err = self.cli('image', 'stage', 'disk', '--threads', '1', stderr=Terminal())
        self.assertEqual(0, rc, err)
        drawn, summary = err.rsplit('\n', 2)[:2]
        self.assertTrue(drawn.startswith('\rstaging disk:1 ['), drawn)
        last = drawn.rpartition('\r')[2]
        self.assertIn(f'] 100% {CHUNKS}/{CHUNKS} chunks 0.1/0.1 MiB', last)
        self.assertIn('#' * image.StageProgress.WIDTH, last)
        self.assertTrue(summary.startswith('vmcloud: staged'), summary)

    def test_no_progress_prints_only_the_summary(self):
        self.imported()
        rc, _, err = self.cli('image', 'stage', 'disk', '--no-progress')
        self.assertEqual(0, rc, err)
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertTrue(err.startswith('vmcloud: staged'), err)

    def test_no_peer_up_is_an_error_naming_the_hosts(self):
        self.imported()
        self.dispatcher.hosts[:] = [host('node1', 'fenced'), host('node2', peer=False)]
        rc, out, err = self.cli('image', 'stage', 'disk')
        self.assertEqual(1, rc)
        self.assertEqual('', out)
        self.assertEqual(['vmcloud: error: no peer to stage to: no compute host is up with '
                          'a peer URL (hosts: node1 (fenced), node2 (up, no peer URL)); the '
                          'compute nodes take part in the peer exchange with [mirror] '
                          'peer_address set'], err.splitlines())
        self.dispatcher.hosts[:] = []
        rc, _, err = self.cli('image', 'stage', 'disk')
        self.assertEqual(1, rc)
        self.assertIn('(hosts: none)', err)
        self.assertEqual([], self.peers.requests)

    def test_an_unknown_image_is_named_before_the_dispatcher_is_asked(self):
        self.dispatcher.hosts[:] = []
        rc, _, err = self.cli('image', 'stage', 'nosuch:3')
        self.assertEqual((1, 'vmcloud: error: image nosuch:3 not found\n'), (rc, err))

    def test_a_peer_given_up_fails_the_command_after_the_others_took_their_chunks(self):
        self.imported()
        self.peers.failures[self.up['node2']] = -1
        rc, out, err = self.cli('image', 'stage', 'disk', '-f', 'json')
        self.assertEqual(1, rc)
        record = json.loads(out)
        self.assertEqual((CHUNKS, 'node2'), (record['chunks'], record['failed_peers']))
        self.assertLess(0, record['short_chunks'])
        self.assertEqual(2 * CHUNKS - record['short_chunks'], record['copies'])
        error, = [line for line in err.splitlines() if 'error' in line]
        self.assertTrue(error.startswith(
            'vmcloud: error: peer node2 failed every attempt and was given up: peer '
            f'{self.up["node2"]} did not serve chunk '), error)
        self.assertTrue(error.endswith(f'{record["short_chunks"]} chunks it owns are a copy '
                                       'short'), error)

    def test_a_chunk_no_owner_takes_fails_the_command_naming_it(self):
        self.imported()
        for url in self.up.values():
            self.peers.failures[url] = -1
        rc, out, err = self.cli('image', 'stage', 'disk')
        self.assertEqual((1, ''), (rc, out))
        error, = [line for line in err.splitlines() if line.startswith('vmcloud: error:')]
        self.assertIn('could not be staged on any of its owners (2 attempts each)', error)
        self.assertIn('.lan:9495: peer http://', error)

    def test_threads_must_be_a_positive_number(self):
        for argv in (('image', 'stage', 'disk', '--threads', '0'),
                     ('image', 'import', self.raw, 'disk', '--stage', '--stage-threads', 'x')):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as exited:
                cli.main(list(argv))
            self.assertEqual(2, exited.exception.code)
            self.assertIn('is not a whole number of at least 1', err.getvalue())

    def test_import_then_stage(self):
        rc, out, err = self.cli('image', 'import', self.raw, 'disk', '--stage', '-f', 'json')
        self.assertEqual(0, rc, err)
        record = json.loads(out)
        self.assertEqual(('disk', 1, CHUNKS * CHUNK), (record['image'], record['version'],
                                                       record['stored_bytes']))
        self.assertEqual((CHUNKS, 2 * CHUNKS, 3), (record['staged_chunks'],
                                                   record['staged_copies'],
                                                   record['staged_peers']))
        self.assertEqual(2 * CHUNKS, len(self.peers.requests))

    def test_import_with_no_peer_up_is_refused_before_the_import(self):
        self.dispatcher.hosts[:] = [host('node1', 'unknown')]
        rc, out, err = self.cli('image', 'import', self.raw, 'disk', '--stage')
        self.assertEqual((1, ''), (rc, out))
        self.assertIn('no peer to stage to', err)
        self.assertEqual([], warehouse_mod.Warehouse(self.conf).images())

    def test_an_import_whose_staging_fails_shows_the_version_and_how_to_retry(self):
        for url in self.up.values():
            self.peers.failures[url] = -1
        rc, out, err = self.cli('image', 'import', self.raw, 'disk', '--stage', '-f', 'json')
        self.assertEqual(1, rc)
        self.assertEqual(('disk', 1), (json.loads(out)['image'], json.loads(out)['version']))
        error, = [line for line in err.splitlines() if line.startswith('vmcloud: error:')]
        self.assertTrue(error.startswith('vmcloud: error: disk:1 is imported but not staged: '
                                         'chunk '), error)
        self.assertTrue(error.endswith("'vmcloud image stage disk:1' tries again"), error)

    def test_import_without_stage_asks_no_dispatcher(self):
        self.dispatcher.hosts[:] = []
        rc, out, err = self.cli('image', 'import', self.raw, 'disk', '-f', 'json')
        self.assertEqual(0, rc, err)
        self.assertNotIn('staged_chunks', json.loads(out))
        self.assertEqual([], self.clients)
