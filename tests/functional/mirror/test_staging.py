"""``vmcloud image stage`` against real peer chunk servers on loopback: four mirror
managers in this process (tests.functional.mirror.test_peers' cluster), the command
run as the CLI runs it, with the real peer client, its peers told by a stand-in
dispatcher over fake://."""
import contextlib
import io
import json

from vmcloud import rpc
from vmcloud.cmd import cli
from vmcloud.dispatcher import rpcapi
from vmcloud.mirror import ownership
from tests.functional.mirror import test_peers
from tests.unit.cmd import test_image_stage

NODES = test_peers.NODES


class StageTest(test_peers.PeersTestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('peer_token', 'staging-secret', 'mirror')
        self.addCleanup(rpc.cleanup)
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('cli_timeout', 5)
        self.nodes = self.cluster()
        self.dispatcher = test_image_stage.FakeDispatcher([
            dict(test_image_stage.host(name), peer_url=node.peer_url())
            for name, node in self.nodes.items()])
        server = rpc.server(self.conf, rpcapi.TOPIC, 'dispatcher', [self.dispatcher])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)

    def stage(self) -> tuple[int, dict, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(['image', 'stage', 'disk', '-f', 'json', '--no-progress'])
        return rc, json.loads(out.getvalue()) if out.getvalue() else {}, err.getvalue()

    def test_each_owner_holds_its_chunks_and_the_repository_served_each_once(self):
        rc, record, err = self.stage()
        self.assertEqual(0, rc, err)
        self.assertEqual((len(self.distinct), 2 * len(self.distinct), 4),
                         (record['chunks'], record['copies'], record['peers']))
        for chunk in self.distinct:
            owners = ownership.owners(chunk, NODES, 2)
            self.assertEqual(set(owners), {n for n, node in self.nodes.items()
                                           if chunk in node.cache}, chunk)
        # The primary fetched it; the secondary had it from the primary.
        self.assertEqual(len(self.distinct), self.repository_reads())
        for (name, chunk), count in self.reads.items():
            self.assertEqual((ownership.owners(chunk, NODES, 2)[0], 1), (name, count))
        stats = {name: node.peer_stats() for name, node in self.nodes.items()}
        self.assertEqual(2 * len(self.distinct), sum(s['staged_chunks'] for s in stats.values()))
        # A deployment after it costs the repository nothing more.
        for name, node in self.nodes.items():
            self.assertBytesEqual(self.image, self.read_image(node, name))
        self.assertEqual(len(self.distinct), self.repository_reads())

    def test_a_dead_peer_fails_the_command_and_the_others_hold_their_chunks(self):
        self.conf.set_override('peer_timeout', 2.0, 'mirror')
        self.nodes['node-b'].peer_server.stop()
        rc, record, err = self.stage()
        self.assertEqual(1, rc, err)
        self.assertEqual(('node-b', len(self.distinct)),
                         (record['failed_peers'], record['chunks']))
        self.assertIn('vmcloud: error: peer node-b failed every attempt and was given up: '
                      f'peer {self.dispatcher.hosts[1]["peer_url"]} did not serve chunk', err)
        for chunk in self.distinct:
            owners = set(ownership.owners(chunk, NODES, 2)) - {'node-b'}
            holders = {n for n, node in self.nodes.items() if chunk in node.cache}
            self.assertEqual(owners, holders - {'node-b'}, chunk)
        # Still once each: a chunk node-b is primary for came to its secondary from the
        # repository (node-b skipped), then to nobody else.
        self.assertEqual(len(self.distinct), self.repository_reads())
