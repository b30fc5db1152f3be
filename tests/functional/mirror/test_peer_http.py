"""The peer chunk protocol over real sockets on the loopback: real servers, caches,
exchanges and a real warehouse; scripted raw peers for the misbehaviour a real one
never shows (silence, trickling, short or malformed answers)."""
import os
import random
import socket
import threading
import time
from unittest import mock

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import ownership
from vmcloud.mirror import peer_http
from vmcloud.mirror import peers
from vmcloud.storage import warehouse
from tests import base
from tests import scripted_peer
from tests.unit.mirror.test_peer_http import FakeClock

CHUNK = 1024 ** 2
NOT_FOUND_OTHER = peer_http.protocol.encode_error(exception.ChunkNotFound('ab' * 32))[1]


class Node:
    """One compute node's peer side: its cache, its exchange, its server."""

    def __init__(self, test: 'PeerHttpTest', name: str, address: str = '127.0.0.1',
                 token: str = '', upload_rate: int = 0, **server_args):
        self.name = name
        self.repository_reads: list[str] = []
        self.gate: threading.Event | None = None
        self.client = peer_http.PeerClient(token, timeout=5.0)
        test.addCleanup(self.client.close)
        self.exchange = peers.PeerExchange(self.repository, self.client, replicas=2,
                                           skip_time=10.0)
        self._warehouse = test.warehouse
        self.cache = cache_mod.ChunkCache(os.path.join(test.tmp, name), 1 << 30,
                                          self.exchange.fetch, attempts=1, retry_wait=0.01)
        test.addCleanup(self.cache.close)
        self.server = peer_http.PeerServer(self.cache, self.exchange, address, 0, token,
                                           upload_rate, 4, **server_args).start()
        test.addCleanup(self.server.stop)

    def repository(self, chunk_id: str) -> bytes:
        self.repository_reads.append(chunk_id)
        if self.gate is not None:
            self.gate.wait(60)
        return self._warehouse.read_chunk(chunk_id)


class PeerHttpTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('chunk_size', CHUNK, 'storage')
        self.warehouse = warehouse.Warehouse(self.conf)
        self.image = random.Random(11).randbytes(6 * CHUNK)
        path = os.path.join(self.tmp, 'image.raw')
        with open(path, 'wb') as f:
            f.write(self.image)
        self.ids = self.warehouse.import_image(path, 'img').manifest.chunks
        self.chunks = {cid: self.image[i * CHUNK:(i + 1) * CHUNK]
                       for i, cid in enumerate(self.ids)}

    def nodes(self, *names: str, **kwargs) -> list[Node]:
        nodes = [Node(self, name, **kwargs) for name in names]
        for node in nodes:
            node.exchange.update(node.name, {n.name: n.server.url for n in nodes})
        return nodes

    def client(self, token: str = '', timeout: float = 5.0) -> peer_http.PeerClient:
        client = peer_http.PeerClient(token, timeout)
        self.addCleanup(client.close)
        return client

    def bounded(self, call, limit: float = 60.0):
        """``call()``'s exception (or result), run in a thread: a hang fails the test
        after ``limit`` s instead of hanging the run (a watchdog, not a measurement)."""
        box = {}

        def run():
            try:
                box['result'] = call()
            except BaseException as exc:  # noqa: B902 - handed to the test
                box['error'] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(limit)
        if thread.is_alive():
            self.fail(f'{call} still running after {limit} s')
        return box.get('error', box.get('result'))


class RoundTripTest(PeerHttpTest):
    def test_get_stage_and_stats(self):
        node, = self.nodes('node1')
        client = self.client()
        first, second = self.ids[:2]
        self.assertBytesEqual(self.chunks[first], client.get(node.server.url, first))
        self.assertBytesEqual(self.chunks[first], client.get(node.server.url, first))
        self.assertEqual([first], node.repository_reads)  # then served from its cache
        client.stage(node.server.url, second)
        self.assertIn(second, node.cache)
        client.stage(node.server.url, second)
        self.assertEqual([first, second], node.repository_reads)
        doc = client.stats(node.server.url)
        self.assertEqual({'host': 'node1', 'peers': {'node1': node.server.url},
                          'replicas': 2, 'served_chunks': 2, 'served_bytes': 2 * CHUNK,
                          'staged_chunks': 2, 'repository_chunks': 2,
                          'repository_bytes': 2 * CHUNK, 'peer_chunks': 0, 'peer_bytes': 0,
                          'peer_failures': 0, 'peer_busy': 0, 'corrupt_from_peers': 0}, doc)
        # Five requests, one connection kept alive.
        self.assertEqual(1, len(client._idle[node.server.url]))

    def test_a_miss_is_served_by_the_primary_with_one_repository_read(self):
        node1, node2 = self.nodes('node1', 'node2')
        by_name = {'node1': node1, 'node2': node2}
        for chunk in self.ids:
            primary = ownership.owners(chunk, ['node1', 'node2'], 2)[0]
            other = node2 if primary == 'node1' else node1
            self.assertBytesEqual(self.chunks[chunk], other.cache.read_chunk(chunk))
            self.assertIn(chunk, by_name[primary].cache)  # the primary kept it too
            self.assertBytesEqual(self.chunks[chunk], by_name[primary].cache.read_chunk(chunk))
        self.assertEqual(sorted(self.ids),
                         sorted(node1.repository_reads + node2.repository_reads))
        from_peers = sum(n.exchange.stats()['peer_bytes'] for n in (node1, node2))
        # Asked on the connection that carried the chunks: counted once they left.
        served = (node2.client.stats(node1.server.url)['served_bytes']
                  + node1.client.stats(node2.server.url)['served_bytes'])
        self.assertEqual(len(self.ids) * CHUNK, from_peers)
        self.assertEqual(from_peers, served)

    def test_a_corrupt_peer_is_caught_by_the_exchange(self):
        # The client hands back what the peer sent; the exchange hashes it.
        wrong = bytes(CHUNK)
        liar = scripted_peer.ScriptedPeer(self, lambda sock: sock.sendall(
            b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % len(wrong) + wrong))
        node, = self.nodes('node2')
        chunk = next(c for c in self.ids if ownership.owners(c, ['liar', 'node2'], 2)[0]
                     == 'liar')
        node.exchange.update('node2', {'node2': node.server.url, 'liar': liar.url})
        self.assertBytesEqual(wrong, self.client().get(liar.url, chunk))
        self.assertBytesEqual(self.chunks[chunk], node.cache.read_chunk(chunk))
        stats = node.exchange.stats()
        self.assertEqual((1, 1, 1), (stats['corrupt_from_peers'], stats['peer_failures'],
                                     stats['repository_chunks']))

    def test_ipv6(self):
        node = Node(self, 'node1', address='::1')
        node.exchange.update('node1', {'node1': node.server.url})
        self.assertTrue(node.server.url.startswith('http://[::1]:'), node.server.url)
        self.assertBytesEqual(self.chunks[self.ids[0]],
                              self.client().get(node.server.url, self.ids[0]))


class SlowPeerTest(PeerHttpTest):
    def test_a_silent_server_is_given_up_within_the_timeout(self):
        silent = scripted_peer.ScriptedPeer(self, lambda sock: None)
        client = self.client(timeout=0.3)
        # A chunk's first bytes get the longer answer wait (the peer may be reading it
        # from its repository), every other answer the timeout itself.
        for call, silence in ((lambda: client.get(silent.url, self.ids[0]), '1.2'),
                              (lambda: client.stats(silent.url), '0.3')):
            error = self.bounded(call)
            self.assertIsInstance(error, exception.PeerError)
            self.assertIn(f'waiting for the answer: silent for {silence} s', error.reason)
            self.assertIsInstance(error.__cause__, TimeoutError)
        self.assertEqual([], client._idle.get(silent.url, []))

    def test_a_silent_stage_is_given_up_within_its_timeout(self):
        silent = scripted_peer.ScriptedPeer(self, lambda sock: None)
        client = peer_http.PeerClient('', 0.2, stage_timeout=0.5)
        self.addCleanup(client.close)
        error = self.bounded(lambda: client.stage(silent.url, self.ids[0]))
        self.assertIsInstance(error, exception.PeerError)
        self.assertIn('silent for 0.5 s', error.reason)

    def test_a_trickling_server_is_given_up_by_the_deadline(self):
        def trickle(sock):
            sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n' % CHUNK)
            for _ in range(CHUNK):
                sock.sendall(b'x')
                time.sleep(0.02)  # always well within the client's timeout

        peer = scripted_peer.ScriptedPeer(self, trickle)
        error = self.bounded(lambda: self.client(timeout=0.5).get(peer.url, self.ids[0]))
        self.assertIsInstance(error, exception.PeerError)
        # 0.5 s * 4 + 1 MiB at 1 MiB/s
        self.assertIn(f'of {CHUNK} bytes within the 3 s an answer of that size gets',
                      error.reason)

    def test_a_refused_connection(self):
        with socket.create_server(('127.0.0.1', 0)) as sock:
            url = f'http://127.0.0.1:{sock.getsockname()[1]}'
        error = self.assertRaises(exception.PeerError, self.client().get, url, self.ids[0])
        self.assertIn('connecting', error.reason)
        self.assertIsInstance(error.__cause__, ConnectionRefusedError)


class BrokenAnswerTest(PeerHttpTest):
    ANSWERS = {
        'short answer: 500 of 1000 bytes':
            b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n' + b'x' * 500,
        'without a Content-Length': b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nxxxx',
        'HTTP 200 answer without a Content-Length':
            b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nxxxx\r\n0\r\n\r\n',
        'malformed answer': b'SPDY/3 200 OK\r\n\r\n',
        'over the': b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n'
                    % (peer_http.protocol.MAX_CHUNK_BYTES + 1),
        'HTTP 500: peer': b'HTTP/1.1 500 Oops\r\nContent-Length: 5\r\n\r\noops!',
        # The repository lacks some other chunk: a confused peer.
        'HTTP 404': b'HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s' % (
            len(NOT_FOUND_OTHER), NOT_FOUND_OTHER),
    }

    # Errors answered in full: the connection may carry the next request.
    COMPLETE = ('HTTP 500: peer', 'HTTP 404')

    def test_short_or_malformed_answers_are_peer_errors_and_the_connection_goes(self):
        for reason, answer in self.ANSWERS.items():
            def send_and_close(sock, answer=answer):
                sock.sendall(answer)
                sock.shutdown(socket.SHUT_WR)

            peer = scripted_peer.ScriptedPeer(self, send_and_close)
            client = self.client()
            error = self.bounded(lambda: client.get(peer.url, self.ids[0]))
            self.assertIsInstance(error, exception.PeerError, reason)
            self.assertIn(reason, error.reason)
            self.assertEqual((peer.url, self.ids[0]), (error.peer, error.chunk_id))
            if reason not in self.COMPLETE:
                self.assertEqual([], client._idle.get(peer.url, []), reason)

    def test_a_short_answer_on_a_connection_kept_open_times_out(self):
        peer = scripted_peer.ScriptedPeer(self, lambda sock: sock.sendall(
            b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n' + b'x' * 500))
        client = self.client(timeout=0.3)
        error = self.bounded(lambda: client.get(peer.url, self.ids[0]))
        self.assertIsInstance(error, exception.PeerError)
        self.assertIn('after 500 of 1000 bytes: silent for 0.3 s', error.reason)
        self.assertEqual([], client._idle.get(peer.url, []))


class StopTest(PeerHttpTest):
    def test_a_server_stopped_mid_transfer_is_a_peer_error(self):
        # 256 KiB/s: the chunk takes seconds, so the stop lands in the middle of it.
        node, = self.nodes('node1', upload_rate=256 * 1024)
        client = self.client()
        result = []
        getter = threading.Thread(target=lambda: result.append(
            self.bounded(lambda: client.get(node.server.url, self.ids[0]))))
        getter.start()
        for _ in range(600):
            if node.server.upload_limit.taken > peer_http.upload_burst(256 * 1024):
                break
            time.sleep(0.01)
        self.assertIsNone(self.bounded(node.server.stop))
        getter.join(60)
        error, = result
        self.assertIsInstance(error, exception.PeerError)
        self.assertIn(f'of {CHUNK} bytes', error.reason)
        self.assertEqual(0, node.server.stats()['served_chunks'])
        # Stopped: the next request is refused.
        error = self.assertRaises(exception.PeerError, client.get, node.server.url,
                                  self.ids[1])
        self.assertIn('connecting', error.reason)

    def test_stop_waits_a_bounded_time_for_a_request_stuck_on_the_repository(self):
        node, = self.nodes('node1')
        node.gate = threading.Event()
        self.addCleanup(node.gate.set)
        client = self.client()
        result = []
        getter = threading.Thread(target=lambda: result.append(
            self.bounded(lambda: client.get(node.server.url, self.ids[0]))))
        getter.start()
        for _ in range(600):
            if node.repository_reads:
                break
            time.sleep(0.01)
        with mock.patch.object(peer_http, 'STOP_WAIT', 0.2):
            self.assertIsNone(self.bounded(node.server.stop))
        getter.join(60)
        self.assertIsInstance(result[0], exception.PeerError)
        # Let the stuck request end (its answer goes nowhere) before the cache closes.
        node.gate.set()
        for _ in range(600):
            if self.ids[0] in node.cache:
                break
            time.sleep(0.01)

    def test_a_pooled_connection_to_a_restarted_server_is_asked_again(self):
        node, = self.nodes('node1')
        client = self.client()
        client.get(node.server.url, self.ids[0])
        self.assertEqual(1, len(client._idle[node.server.url]))
        node.server.stop()
        port = int(node.server.url.rsplit(':', 1)[1])
        again = peer_http.PeerServer(node.cache, node.exchange, '127.0.0.1', port, '', 0,
                                     4).start()
        self.addCleanup(again.stop)
        self.assertEqual(node.server.url, again.url)
        self.assertBytesEqual(self.chunks[self.ids[1]], client.get(again.url, self.ids[1]))
        self.assertEqual(1, client.stats(again.url)['served_chunks'])

    def test_a_client_vanishing_mid_body_leaves_the_server_serving(self):
        node, = self.nodes('node1', upload_rate=1024 ** 2)
        port = int(node.server.url.rsplit(':', 1)[1])
        for _ in range(3):
            with socket.create_connection(('127.0.0.1', port)) as sock:
                sock.sendall(f'GET /v1/chunks/{self.ids[0]} HTTP/1.1\r\n\r\n'.encode())
                self.assertTrue(sock.recv(100).startswith(b'HTTP/1.1 200 OK'))
        client = self.client()
        self.assertBytesEqual(self.chunks[self.ids[0]], client.get(node.server.url, self.ids[0]))
        # 1 MiB/s: the vanished clients went long before their chunk could leave whole.
        self.assertEqual(1, client.stats(node.server.url)['served_chunks'])


class UploadRateTest(PeerHttpTest):
    def test_the_upload_rate_caps_every_transfer_together(self):
        rate = 512 * 1024
        clock = FakeClock()
        node, = self.nodes('node1', upload_rate=rate, clock=clock.time, sleep=clock.sleep)
        errors = []
        clients = [self.client() for _ in range(3)]

        def get(client, chunk):
            try:
                self.assertBytesEqual(self.chunks[chunk], client.get(node.server.url, chunk))
                client.stats(node.server.url)  # on the same connection: once it is counted
            except Exception as exc:  # noqa: B902 - reported below
                errors.append(exc)

        getters = [threading.Thread(target=get, args=args)
                   for args in zip(clients, self.ids[:3])]
        for getter in getters:
            getter.start()
        for getter in getters:
            getter.join(60)
        self.assertEqual([], errors)
        served = node.server.stats()['served_bytes']
        self.assertEqual(3 * CHUNK, served)
        limit = node.server.upload_limit
        self.assertEqual(served, limit.taken)  # every byte of a chunk body went through it
        # By any time t at most burst + rate * t bytes went: the clock is past that.
        self.assertGreaterEqual(clock.slept, (served - limit.burst) / rate - 1e-9)
        # Stats and errors are not chunk bodies: they pass without waiting.
        slept = clock.slept
        self.client().stats(node.server.url)
        self.assertEqual(slept, clock.slept)

    def test_no_limit_when_the_rate_is_zero(self):
        node, = self.nodes('node1', upload_rate=0)
        self.assertIsNone(node.server.upload_limit)
        self.assertBytesEqual(self.chunks[self.ids[0]],
                              self.client().get(node.server.url, self.ids[0]))
