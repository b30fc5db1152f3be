"""The peer chunk protocol's checks: ids, the token, busy, errors, stats, the upload limit.

A real PeerServer on 127.0.0.1 over a real ChunkCache; the exchange is a fake that
holds the "repository" in a dict.
"""
import contextlib
import hashlib
import http.client
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

import fixtures

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import ownership
from vmcloud.mirror import peer_http
from vmcloud.mirror import peers as peers_mod
from vmcloud.storage import protocol
from tests import base
from tests import scripted_peer

CHUNK = 64 * 1024
STATS_KEYS = {'host', 'peers', 'replicas', 'served_chunks', 'served_bytes', 'staged_chunks',
              'repository_chunks', 'repository_bytes', 'peer_chunks', 'peer_bytes',
              'peer_failures', 'peer_busy', 'corrupt_from_peers'}


def make_chunks(count: int, size: int = CHUNK, seed: int = 3) -> dict[str, bytes]:
    rng = random.Random(seed)
    chunks = (rng.randbytes(size) for _ in range(count))
    return {hashlib.sha256(data).hexdigest(): data for data in chunks}


class FakeExchange:
    """The repository is ``chunks``; ``gate``, if set, holds every repository read."""

    def __init__(self, chunks: dict[str, bytes]):
        self.chunks = chunks
        self.me = 'node1'
        self.replicas = 2
        self.reads: list[str] = []
        self.gate: threading.Event | None = None
        self.reading = threading.Event()
        self.failure: Exception | None = None
        self.asking: set[str] = set()  # chunks "this node" is asking its peers for

    def fetch_from_repository(self, chunk_id: str) -> bytes:
        self.reads.append(chunk_id)
        self.reading.set()
        if self.gate is not None:
            self.gate.wait(60)
        if self.failure is not None:
            raise self.failure
        try:
            return self.chunks[chunk_id]
        except KeyError:
            raise exception.ChunkNotFound(chunk_id) from None

    fetch = fetch_from_repository

    def asking_peers(self, chunk_id: str) -> bool:
        return chunk_id in self.asking

    def stats(self) -> dict:
        return {'repository_chunks': len(self.reads),
                'repository_bytes': sum(len(self.chunks.get(c, b'')) for c in self.reads),
                'peer_chunks': 0, 'peer_bytes': 0, 'peer_failures': 0,
                'peer_busy': 0, 'corrupt_from_peers': 0}

    def peers(self) -> dict[str, str]:
        return {'node1': 'http://127.0.0.1:1', 'node2': 'http://127.0.0.1:2'}


class FakeClock:
    """Time that passes only when someone sleeps."""

    def __init__(self):
        self.now = 0.0
        self.slept = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
            self.slept += seconds


def raw_request(url: str, request: bytes, timeout: float = 30.0
                ) -> tuple[int, http.client.HTTPResponse, bytes]:
    """Send ``request`` as is; (status, response, body)."""
    host, port = url.removeprefix('http://').rsplit(':', 1)
    with socket.create_connection((host.strip('[]'), int(port)), timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response, response.read()


def error_of(body: bytes) -> str:
    return json.loads(body)['error']


class PeerTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.chunks = make_chunks(4)
        self.ids = sorted(self.chunks)
        self.exchange = FakeExchange(self.chunks)
        self.cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'cache'), 1 << 30,
                                          self.exchange.fetch, attempts=1, retry_wait=0.01)
        self.addCleanup(self.cache.close)

    def serve(self, token: str = '', threads: int = 4, upload_rate: int = 0,
              **kwargs) -> peer_http.PeerServer:
        server = peer_http.PeerServer(self.cache, self.exchange, '127.0.0.1', 0, token,
                                      upload_rate, threads, **kwargs).start()
        self.addCleanup(server.stop)
        return server

    def client(self, token: str = '', timeout: float = 10.0) -> peer_http.PeerClient:
        client = peer_http.PeerClient(token, timeout)
        self.addCleanup(client.close)
        return client


class ChunkIdTest(PeerTestCase):
    BAD = ['', 'A' * 64, 'a' * 63, 'a' * 65, 'g' * 64, '../' + 'a' * 61, 'a' * 63 + '\n',
           None, 7]

    def test_client_refuses_a_malformed_id_before_any_request(self):
        client = self.client()
        with mock.patch.object(http.client, 'HTTPConnection') as connection:
            for bad in self.BAD:
                for call in (client.get, client.stage):
                    error = self.assertRaises(exception.InvalidName, call,
                                              'http://127.0.0.1:9', bad)
                    self.assertIn('64 lowercase hex digits', str(error))
        connection.assert_not_called()

    def test_server_refuses_a_malformed_id(self):
        server = self.serve()
        for method, path in (('GET', '/v1/chunks/' + 'A' * 64),
                             ('GET', '/v1/chunks/' + 'a' * 63),
                             ('GET', f'/v1/chunks/{self.ids[0]}?x=1'),
                             ('POST', '/v1/chunks/' + 'x' * 64 + '/stage')):
            status, _, body = raw_request(
                server.url, f'{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
            self.assertEqual(400, status, path)
            self.assertEqual('InvalidName', error_of(body))
        self.assertEqual([], self.exchange.reads)


class TokenTest(PeerTestCase):
    def test_a_missing_or_wrong_token_is_refused(self):
        server = self.serve(token='sesame')
        chunk = self.ids[0]
        for token in ('', 'sesam', 'sesame2'):
            error = self.assertRaises(exception.PeerError, self.client(token).get,
                                      server.url, chunk)
            self.assertIn('HTTP 401', error.reason)
            self.assertIn('bearer token', error.reason)
            self.assertIsInstance(error.__cause__, protocol.Unauthorized)
        status, response, body = raw_request(
            server.url, f'GET /v1/chunks/{chunk} HTTP/1.1\r\nAuthorization: Basic '
                        'sesame\r\n\r\n'.encode())
        self.assertEqual(401, status)
        self.assertEqual('Unauthorized', error_of(body))
        self.assertIn('Bearer', response.getheader('WWW-Authenticate'))
        # Refused before anything was fetched or counted.
        self.assertEqual([], self.exchange.reads)
        self.assertEqual(0, server.stats()['served_chunks'])
        self.assertBytesEqual(self.chunks[chunk], self.client('sesame').get(server.url, chunk))

    def test_every_route_asks_for_the_token(self):
        server = self.serve(token='sesame')
        client = self.client('wrong')
        for call in (lambda: client.stats(server.url),
                     lambda: client.stage(server.url, self.ids[0])):
            self.assertIn('HTTP 401', self.assertRaises(exception.PeerError, call).reason)
        self.assertNotIn(self.ids[0], self.cache)

    def test_a_token_that_cannot_travel_in_a_header_is_a_config_error(self):
        for token in ('two\nlines', ' padded', 'caf\u00e9'):
            self.assertRaises(exception.ConfigError, peer_http.PeerClient, token, 1.0)
            self.assertRaises(exception.ConfigError, peer_http.PeerServer, self.cache,
                              self.exchange, '127.0.0.1', 0, token, 0, 1)

    def test_an_empty_token_asks_for_none(self):
        server = self.serve(token='')
        self.assertBytesEqual(self.chunks[self.ids[0]],
                              self.client('anything').get(server.url, self.ids[0]))


class BusyTest(PeerTestCase):
    def test_requests_beyond_the_threads_are_answered_busy_not_queued(self):
        server = self.serve(threads=1)
        self.exchange.gate = threading.Event()
        self.addCleanup(self.exchange.gate.set)
        results = []
        first_client = self.client()
        first = threading.Thread(target=lambda: results.append(
            first_client.get(server.url, self.ids[0])))
        first.start()
        self.assertTrue(self.exchange.reading.wait(30))
        # The one thread is taken: every other request is refused at once, stats too.
        error = self.assertRaises(exception.PeerError, self.client().get, server.url,
                                  self.ids[1])
        self.assertIn('HTTP 503', error.reason)
        self.assertIn('[mirror] peer_threads', error.reason)
        self.assertIsInstance(error.__cause__, exception.WarehouseBusy)
        self.assertIn('HTTP 503', self.assertRaises(
            exception.PeerError, self.client().stats, server.url).reason)
        self.assertEqual([self.ids[0]], self.exchange.reads)
        self.exchange.gate.set()
        first.join(30)
        self.assertEqual([self.chunks[self.ids[0]]], results)
        # The slot is free again (asked on the first request's connection: after it).
        self.assertBytesEqual(self.chunks[self.ids[1]],
                              first_client.get(server.url, self.ids[1]))

    def test_connections_beyond_the_limit_are_refused(self):
        server = self.serve(threads=1)
        held = []
        for _ in range(peer_http.CONNECTIONS_PER_THREAD):
            held.append(socket.create_connection(('127.0.0.1', int(server.url.split(':')[-1]))))
            self.addCleanup(held[-1].close)
        error = self.assertRaises(exception.PeerError, self.client().get, server.url,
                                  self.ids[0])
        self.assertNotIn(self.ids[0], self.cache)
        self.assertEqual(self.ids[0], error.chunk_id)


class StatsTest(PeerTestCase):
    def test_the_document_has_the_contract_keys_and_counts(self):
        server = self.serve()
        client = self.client()
        client.get(server.url, self.ids[0])
        client.get(server.url, self.ids[0])
        client.stage(server.url, self.ids[1])
        client.stage(server.url, self.ids[1])
        doc = client.stats(server.url)
        self.assertEqual(STATS_KEYS, set(doc))
        self.assertEqual('node1', doc['host'])
        self.assertEqual(self.exchange.peers(), doc['peers'])
        self.assertEqual(2, doc['replicas'])
        self.assertEqual(2, doc['served_chunks'])
        self.assertEqual(2 * CHUNK, doc['served_bytes'])
        self.assertEqual(2, doc['staged_chunks'])
        self.assertEqual(2, doc['repository_chunks'])  # each chunk fetched once
        self.assertEqual(doc, server.document())
        self.assertEqual({'served_chunks': 2, 'served_bytes': 2 * CHUNK,
                          'staged_chunks': 2}, server.stats())


class LifecycleTest(PeerTestCase):
    def test_a_server_starts_once(self):
        server = self.serve()
        self.assertRaises(exception.MirrorError, server.start)
        server.stop()
        server.stop()
        self.assertRaises(exception.MirrorError, server.start)

    def test_a_port_in_use_is_an_error_naming_it(self):
        server = self.serve()
        port = int(server.url.rsplit(':', 1)[1])
        other = peer_http.PeerServer(self.cache, self.exchange, '127.0.0.1', port, '', 0, 1)
        error = self.assertRaises(exception.MirrorError, other.start)
        self.assertIn(f'127.0.0.1 port {port}', str(error))


class RequestTest(PeerTestCase):
    def test_unknown_paths_and_wrong_methods(self):
        server = self.serve()
        chunk = self.ids[0]
        for request, status in ((f'GET /v1/chunk/{chunk}', 404), ('GET /v1/stats/', 404),
                                (f'POST /v1/chunks/{chunk}', 405),
                                (f'GET /v1/chunks/{chunk}/stage', 405),
                                (f'DELETE /v1/chunks/{chunk}', 405),
                                ('POST /v1/stats', 405)):
            got, response, body = raw_request(server.url,
                                              f'{request} HTTP/1.1\r\n\r\n'.encode())
            self.assertEqual(status, got, request)
            self.assertEqual('RequestRefused', error_of(body))
            if status == 405:
                self.assertIn(response.getheader('Allow'), ('GET', 'POST', 'GET, PUT'))
        self.assertEqual([], self.exchange.reads)

    def test_an_oversized_or_malformed_head_or_a_body_is_refused_and_closed(self):
        server = self.serve()
        chunk = self.ids[0]
        for request, status in (
                (f'GET /v1/chunks/{chunk} HTTP/1.1\r\nX: {"y" * 9000}\r\n\r\n', 431),
                ('G' * 10000, 431),
                (f'GET /v1/chunks/{chunk}\r\n\r\n', 400),
                (f'GET /v1/chunks/{chunk} SPDY/3\r\n\r\n', 400),
                (f'POST /v1/chunks/{chunk}/stage HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc',
                 400),
                (f'POST /v1/chunks/{chunk}/stage HTTP/1.1\r\n'
                 'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n', 400)):
            got, response, body = raw_request(server.url, request.encode())
            self.assertEqual(status, got, request[:60])
            self.assertEqual('close', response.getheader('Connection'))
            self.assertEqual('RequestRefused', error_of(body))
        self.assertEqual([], self.exchange.reads)

    def test_keep_alive_serves_requests_one_after_the_other(self):
        server = self.serve()
        client = self.client()
        for chunk in self.ids:
            self.assertBytesEqual(self.chunks[chunk], client.get(server.url, chunk))
        self.assertEqual(1, len(client._idle[server.url]))
        # HTTP/1.0 without keep-alive, and Connection: close, end the connection.
        for version, header in (('HTTP/1.0', ''), ('HTTP/1.1', 'Connection: close\r\n')):
            _, response, body = raw_request(
                server.url, f'GET /v1/chunks/{self.ids[0]} {version}\r\n{header}\r\n'.encode())
            self.assertEqual('close', response.getheader('Connection'))
            self.assertBytesEqual(self.chunks[self.ids[0]], body)


class FailureTest(PeerTestCase):
    def test_a_chunk_the_repository_lacks_is_chunk_not_found(self):
        server = self.serve()
        client = self.client()
        missing = 'ab' * 32
        error = self.assertRaises(exception.ChunkNotFound, client.get, server.url, missing)
        self.assertEqual(missing, error.chunk_id)
        self.assertRaises(exception.ChunkNotFound, client.stage, server.url, missing)
        # An error answered in full leaves the connection usable.
        self.assertEqual(1, len(client._idle[server.url]))

    def test_a_failed_fetch_is_a_502_raised_as_the_repository_error(self):
        server = self.serve()
        self.exchange.failure = exception.CorruptManifest('the repository is on fire')
        for call in (self.client().get, self.client().stage):
            error = self.assertRaises(exception.StorageError, call, server.url, self.ids[0])
            self.assertNotIsInstance(error, exception.PeerError)
            self.assertIn('FetchFailed', str(error))
            self.assertIn('the repository is on fire', str(error))
        # The repository's error itself, when it is no FetchFailed, keeps its class.
        status, body = protocol.encode_error(exception.CorruptManifest('its store is hurt'))
        peer = scripted_peer.ScriptedPeer(self, scripted_peer.answer(
            b'HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n'
            b'Content-Length: %d\r\n\r\n%s' % (len(body), body)))
        self.assertRaises(exception.CorruptManifest, self.client().get, peer.url,
                          self.ids[0])

    def test_a_502_that_is_no_error_of_the_protocol_is_the_peers_failure(self):
        peer = scripted_peer.ScriptedPeer(self, scripted_peer.answer(
            b'HTTP/1.1 502 Bad Gateway\r\nContent-Length: 9\r\n\r\n<html/>\r\n'))
        error = self.assertRaises(exception.PeerError, self.client().get, peer.url,
                                  self.ids[0])
        self.assertIn('HTTP 502', error.reason)

    def test_a_peer_whose_repository_failed_is_not_skipped(self):
        server = self.serve()
        self.exchange.failure = exception.StorageError('the repository is on fire')
        chunk = next(c for c in self.chunks
                     if ownership.owners(c, ['me', 'peer'], 2)[0] == 'peer')
        reads = []

        def repository(chunk_id):
            reads.append(chunk_id)
            return self.chunks[chunk_id]

        exchange = peers_mod.PeerExchange(repository, self.client(), 2, skip_time=3600)
        exchange.update('me', {'me': 'http://127.0.0.1:1', 'peer': server.url})
        for attempt in (1, 2):
            self.assertBytesEqual(self.chunks[chunk], exchange.fetch(chunk))
            # The peer was asked (again: not skipped), then the repository, once.
            self.assertEqual([chunk] * attempt, self.exchange.reads)
            self.assertEqual([chunk] * attempt, reads)
        stats = exchange.stats()
        self.assertEqual((0, 0, 2), (stats['peer_failures'], stats['peer_chunks'],
                                     stats['repository_chunks']))

    def test_the_status_of_each_failure(self):
        chunk = self.ids[0]

        def fetch_failed(cause):
            try:
                raise exception.FetchFailed(chunk, 2, cause) from cause
            except exception.FetchFailed as exc:
                return exc

        for exc, status, name in (
                (fetch_failed(exception.ChunkNotFound(chunk)), 404, 'ChunkNotFound'),
                (exception.ChunkNotFound(chunk), 404, 'ChunkNotFound'),
                (fetch_failed(exception.WarehouseBusy('busy')), 503, 'WarehouseBusy'),
                (fetch_failed(OSError(5, 'EIO')), 502, 'StorageError'),
                (exception.CorruptChunk(chunk, 'ff' * 32), 502, 'CorruptChunk'),
                (OSError(28, 'no space'), 500, 'StorageError')):
            got, error = peer_http._failure(chunk, exc)
            self.assertEqual(status, got, exc)
            self.assertEqual(name, error_of(protocol.encode_error(error)[1]), exc)

    def test_a_peer_url_that_is_not_one_is_refused(self):
        client = self.client()
        for url in ('https://127.0.0.1:9', 'http://127.0.0.1:9/v1', 'http://:9', 'x',
                    'http://127.0.0.1:99999'):
            error = self.assertRaises(exception.PeerError, client.get, url, self.ids[0])
            self.assertIn('not a peer URL', error.reason)

    def test_the_error_names_peer_chunk_and_reason(self):
        error = exception.PeerError('http://n2:9495', 'ab' * 32, 'silent for 2 s')
        self.assertEqual(f'peer http://n2:9495 did not serve chunk {"ab" * 32}: '
                         'silent for 2 s', str(error))
        self.assertIn('its stats', str(exception.PeerError('http://n2:9495', None, 'x')))
        self.assertIsInstance(error, exception.MirrorError)


class TokenBucketTest(base.TestCase):
    def test_a_burst_then_the_rate(self):
        clock = FakeClock()
        bucket = peer_http.TokenBucket(1000, 100, clock.time, clock.sleep)
        bucket.take(100)
        self.assertEqual(0, clock.slept)  # the burst
        bucket.take(100)
        self.assertAlmostEqual(0.1, clock.slept)
        for _ in range(8):
            bucket.take(100)
        self.assertAlmostEqual(0.9, clock.slept)  # 1000 bytes: the burst + 0.9 s
        self.assertEqual(1000, bucket.taken)

    def test_idle_time_refills_up_to_the_burst_only(self):
        clock = FakeClock()
        bucket = peer_http.TokenBucket(1000, 100, clock.time, clock.sleep)
        clock.now = 3600.0
        bucket.take(100)
        bucket.take(100)
        self.assertAlmostEqual(0.1, clock.slept)

    def test_takers_share_the_rate(self):
        # Two takers reserving at once: the second waits for the first's bytes too.
        waits = []
        bucket = peer_http.TokenBucket(1000, 100, lambda: 0.0, waits.append)
        bucket.take(100)
        bucket.take(100)
        bucket.take(100)
        self.assertEqual([0.1, 0.2], [round(w, 6) for w in waits])

    def test_the_server_limits_chunk_bodies_only(self):
        cache = mock.Mock()
        server = peer_http.PeerServer(cache, FakeExchange({}), '127.0.0.1', 0, '', 0, 1)
        self.assertIsNone(server.upload_limit)
        server = peer_http.PeerServer(cache, FakeExchange({}), '127.0.0.1', 0, '',
                                      10 * 1024 ** 2, 1)
        self.assertEqual(peer_http.upload_burst(10 * 1024 ** 2), server.upload_limit.burst)
        self.assertRaises(exception.ConfigError, peer_http.PeerServer, cache,
                          FakeExchange({}), '127.0.0.1', 0, '', 0, 0)


class JoinTest(PeerTestCase):
    """A peer's request for a chunk the node is fetching already."""

    def start_a_gated_read(self, server: peer_http.PeerServer) -> threading.Thread:
        self.exchange.gate = threading.Event()
        self.addCleanup(self.exchange.gate.set)
        client = self.client()
        self.first = []
        first = threading.Thread(target=lambda: self.first.append(
            client.get(server.url, self.ids[0])))
        first.start()
        self.assertTrue(self.exchange.reading.wait(30))
        return first

    def test_a_request_waits_for_the_nodes_repository_read(self):
        server = self.serve()
        first = self.start_a_gated_read(server)
        client = self.client()
        second = []
        joined = threading.Thread(target=lambda: second.append(
            client.get(server.url, self.ids[0])))
        joined.start()
        joined.join(0.2)
        self.assertTrue(joined.is_alive())  # waiting for the repository read, not refused
        self.exchange.gate.set()
        first.join(30)
        joined.join(30)
        self.assertEqual([self.chunks[self.ids[0]]] * 2, self.first + second)
        self.assertEqual([self.ids[0]], self.exchange.reads)

    def test_a_request_never_waits_for_a_fetch_that_asks_peers(self):
        server = self.serve()
        first = self.start_a_gated_read(server)
        self.exchange.asking.add(self.ids[0])  # the node's fetch is asking its peers now
        error = self.assertRaises(exception.PeerError, self.client().get, server.url,
                                  self.ids[0])
        self.assertIn('HTTP 503', error.reason)
        self.assertIn('asking its peers', error.reason)
        self.assertIsInstance(error.__cause__, exception.WarehouseBusy)
        self.exchange.gate.set()
        first.join(30)
        self.assertEqual([self.chunks[self.ids[0]]], self.first)
        self.assertEqual([self.ids[0]], self.exchange.reads)

    def test_two_nodes_asking_each_other_for_a_chunk_do_not_wait_for_each_other(self):
        # R = 3 with the first owner down: x asks y and y asks x, each while fetching.
        chunks = make_chunks(64, 4096, seed=5)
        chunk = next(c for c in chunks if ownership.owners(c, ['w', 'x', 'y'], 3)
                     == ['w', 'x', 'y'])
        both_fetching = threading.Barrier(2)

        class BothAskAtOnce:
            def __init__(self, client, other_url):
                self.client, self.other_url = client, other_url

            def get(self, url, chunk_id):
                if url == self.other_url:
                    both_fetching.wait(30)
                return self.client.get(url, chunk_id)

        nodes = {}
        for name in ('x', 'y'):
            reads = []

            def repository(chunk_id, reads=reads):
                reads.append(chunk_id)
                return chunks[chunk_id]

            client = peer_http.PeerClient('', timeout=0.5)
            self.addCleanup(client.close)
            exchange = peers_mod.PeerExchange(repository, client, 3, skip_time=3600)
            cache = cache_mod.ChunkCache(os.path.join(self.tmp, name), 1 << 24,
                                         exchange.fetch, attempts=1)
            self.addCleanup(cache.close)
            server = peer_http.PeerServer(cache, exchange, '127.0.0.1', 0, '', 0, 4).start()
            self.addCleanup(server.stop)
            nodes[name] = (exchange, cache, server, reads)
        view = {'w': 'http://127.0.0.1:1', 'x': nodes['x'][2].url, 'y': nodes['y'][2].url}
        for name, other in (('x', 'y'), ('y', 'x')):
            exchange = nodes[name][0]
            exchange._client = BothAskAtOnce(exchange._client, view[other])
            exchange.update(name, view)
        results = {}
        readers = [threading.Thread(target=lambda name=name: results.update(
            {name: nodes[name][1].read_chunk(chunk)})) for name in nodes]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
        self.assertEqual({'x': chunks[chunk], 'y': chunks[chunk]}, results)
        busy = 0
        for name, (exchange, _cache, _server, reads) in nodes.items():
            stats = exchange.stats()
            # w failed (refused); the other node answered at once: busy while it was
            # asking peers itself, or the chunk once its own read had it. Never a
            # failure: neither waited for the other until its timeout.
            self.assertEqual((1, 1), (stats['peer_failures'],
                                      stats['peer_busy'] + stats['peer_chunks']), name)
            self.assertEqual(stats['peer_busy'], len(reads), name)
            self.assertFalse(exchange.asking_peers(chunk))
            busy += stats['peer_busy']
        # The first of the two requests answered found the other node asking peers.
        self.assertGreaterEqual(busy, 1)


class AnswerWaitTest(PeerTestCase):
    def test_the_head_of_a_chunk_may_take_longer_than_the_timeout(self):
        # A slow repository read is not a dead peer: the head gets answer_timeout.
        server = self.serve()
        client = self.client(timeout=0.25)
        self.assertEqual(1.0, client.answer_timeout)
        self.exchange.gate = threading.Event()
        timer = threading.Timer(0.5, self.exchange.gate.set)
        timer.start()
        self.addCleanup(timer.cancel)
        self.assertBytesEqual(self.chunks[self.ids[0]], client.get(server.url, self.ids[0]))

    def test_a_silent_peer_is_given_up_after_the_answer_timeout(self):
        peer = scripted_peer.ScriptedPeer(self, lambda sock: None)
        for client, waited in ((self.client(timeout=0.1), '0.4'),
                               (peer_http.PeerClient('', 0.1, answer_timeout=0.2), '0.2')):
            self.addCleanup(client.close)
            error = self.assertRaises(exception.PeerError, client.get, peer.url, self.ids[0])
            self.assertEqual(f'waiting for the answer: silent for {waited} s', error.reason)
        # Never less than the timeout.
        self.assertEqual(2.0, peer_http.PeerClient('', 2.0, answer_timeout=1.0).answer_timeout)


class HeadDeadlineTest(PeerTestCase):
    def test_a_head_sent_a_byte_at_a_time_is_cut_off(self):
        self.patch(peer_http, 'HEAD_TIMEOUT', 0.3)
        server = self.serve()
        host, port = server.url.removeprefix('http://').rsplit(':', 1)
        request = f'GET /v1/chunks/{self.ids[0]} HTTP/1.1\r\nX-Slow: {"y" * 200}'.encode()
        sent = []
        with socket.create_connection((host, int(port)), 30) as sock:
            def dribble():
                try:
                    for byte in request:
                        sock.sendall(bytes([byte]))
                        sent.append(byte)
                        time.sleep(0.02)  # each byte well within IO_TIMEOUT
                except OSError:
                    pass  # the server closed the connection

            sender = threading.Thread(target=dribble)
            sender.start()
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = response.read()
            sender.join(30)
        self.assertEqual(408, response.status)
        self.assertEqual('RequestRefused', error_of(body))
        self.assertIn('took over 0.3 s', json.loads(body)['message'])
        self.assertLess(len(sent), len(request))  # answered before the head was whole
        self.assertEqual([], self.exchange.reads)

    def test_a_head_that_comes_whole_is_served_after_an_idle_wait(self):
        self.patch(peer_http, 'HEAD_TIMEOUT', 0.3)
        server = self.serve()
        host, port = server.url.removeprefix('http://').rsplit(':', 1)
        with socket.create_connection((host, int(port)), 30) as sock:
            time.sleep(0.5)  # idle longer than HEAD_TIMEOUT before the request: no matter
            sock.sendall(f'GET /v1/chunks/{self.ids[0]} HTTP/1.1\r\n\r\n'.encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            self.assertEqual(200, response.status)
            self.assertBytesEqual(self.chunks[self.ids[0]], response.read())


class BodyDeadlineTest(PeerTestCase):
    def put_dribbled(self, server, chunk_id: str, pause: float) -> tuple[int, bytes, int]:
        """A PUT of chunk ``chunk_id`` whose body is sent 64 bytes every ``pause`` s:
        (status, body, body bytes sent before the answer)."""
        host, port = server.url.removeprefix('http://').rsplit(':', 1)
        data = self.chunks[chunk_id]
        sent = [0]
        with socket.create_connection((host, int(port)), 30) as sock:
            sock.sendall(f'PUT /v1/chunks/{chunk_id} HTTP/1.1\r\n'
                         f'Content-Length: {len(data)}\r\n\r\n'.encode())

            def dribble():
                try:
                    for at in range(0, len(data), 64):
                        sock.sendall(data[at:at + 64])
                        sent[0] += 64
                        time.sleep(pause)
                except OSError:
                    pass  # the server closed the connection
            sender = threading.Thread(target=dribble)
            sender.start()
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = response.read()
            sent_before = sent[0]
            # Stops the sender; a connection the server has reset already stopped it.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sender.join(30)
        return response.status, body, sent_before

    def test_a_body_sent_a_little_at_a_time_is_cut_off_and_not_kept(self):
        self.patch(peer_http, 'HEAD_TIMEOUT', 0.3)
        self.patch(peer_http, 'SLOWEST_RATE', 1 << 40)  # the deadline: HEAD_TIMEOUT alone
        server = self.serve()
        status, body, sent = self.put_dribbled(server, self.ids[1], 0.01)
        self.assertEqual(408, status)
        self.assertEqual('RequestRefused', error_of(body))
        self.assertIn('took over 0.3 s', json.loads(body)['message'])
        self.assertLess(sent, len(self.chunks[self.ids[1]]))
        self.assertNotIn(self.ids[1], self.cache)

    def test_a_slow_body_within_its_deadline_is_kept(self):
        self.patch(peer_http, 'HEAD_TIMEOUT', 0.3)
        server = self.serve()
        chunk_id = self.ids[1]
        self.patch(peer_http, 'SLOWEST_RATE', len(self.chunks[chunk_id]) / 30)
        status, body, _ = self.put_dribbled(server, chunk_id, 0.0005)
        self.assertEqual(201, status, body)
        self.assertIn(chunk_id, self.cache)


class ConnectionsPerAddressTest(PeerTestCase):
    def test_connections_beyond_the_per_address_cap_are_refused(self):
        server = self.serve(connections_per_address=2)
        port = int(server.url.rsplit(':', 1)[1])
        held = []
        for _ in range(2):
            held.append(socket.create_connection(('127.0.0.1', port), 30))
            self.addCleanup(held[-1].close)
        error = self.assertRaises(exception.PeerError, self.client().get, server.url,
                                  self.ids[0])
        self.assertIn('HTTP 503', error.reason)
        self.assertIn('[mirror] peer_connections_per_address', error.reason)
        self.assertIsInstance(error.__cause__, exception.WarehouseBusy)
        self.assertEqual([], self.exchange.reads)
        # Another address is served meanwhile.
        with socket.create_connection(('127.0.0.1', port), 30,
                                      source_address=('127.0.0.2', 0)) as sock:
            sock.sendall(f'GET /v1/chunks/{self.ids[0]} HTTP/1.1\r\n\r\n'.encode())
            response = http.client.HTTPResponse(sock)
            response.begin()
            self.assertEqual(200, response.status)
            self.assertBytesEqual(self.chunks[self.ids[0]], response.read())
        # A connection closed gives its place back.
        held.pop().close()
        client = self.client()
        for _ in range(600):
            try:
                self.assertBytesEqual(self.chunks[self.ids[0]],
                                      client.get(server.url, self.ids[0]))
                break
            except exception.PeerError:
                time.sleep(0.05)  # the server has not seen the close yet
        else:
            self.fail('the closed connection\'s place was never given back')

    def test_a_bad_cap_is_refused_by_name(self):
        error = self.assertRaises(exception.ConfigError, peer_http.PeerServer, self.cache,
                                  self.exchange, '127.0.0.1', 0, '', 0, 1,
                                  connections_per_address=0)
        self.assertIn('[mirror] peer_connections_per_address', str(error))


class AddressTest(PeerTestCase):
    def test_a_wildcard_or_empty_address_is_refused_by_name(self):
        for address in ('0.0.0.0', '0', '0.0', '0x0', '::', '[::]', '::0', '0:0::0',
                        '::%lo', '', ' ', '*'):
            error = self.assertRaises(exception.ConfigError, peer_http.PeerServer,
                                      self.cache, self.exchange, address, 0, '', 0, 1)
            self.assertIn('[mirror] peer_address', str(error))
            self.assertIn('peer URL', str(error))

    def test_an_address_of_the_node_is_taken(self):
        for address in ('127.0.0.1', '::1', '10.0.0.2', 'localhost', 'node1.example'):
            self.assertEqual(address, peer_http.check_peer_address(address))


class WithoutTokenTest(PeerTestCase):
    def test_a_server_without_a_token_warns_once(self):
        logs = self.useFixture(fixtures.FakeLogger(level=logging.WARNING))
        server = self.serve(token='')
        client = self.client()
        client.get(server.url, self.ids[0])
        client.get(server.url, self.ids[1])
        warnings = [line for line in logs.output.splitlines() if 'peer_token' in line]
        self.assertEqual(1, len(warnings), logs.output)
        self.assertIn('[mirror] peer_token is empty', warnings[0])
        self.assertIn(server.url, warnings[0])
        self.serve(token='sesame')
        self.assertEqual(1, logs.output.count('peer_token is empty'), logs.output)


class ClosedCacheTest(PeerTestCase):
    def test_requests_after_the_cache_closed_are_answered_busy_without_a_traceback(self):
        logs = self.useFixture(fixtures.FakeLogger(level=logging.DEBUG))
        server = self.serve()
        client = self.client()
        client.get(server.url, self.ids[0])
        self.cache.close()
        for call in (lambda: client.get(server.url, self.ids[0]),
                     lambda: client.get(server.url, self.ids[1]),
                     lambda: client.stage(server.url, self.ids[1]),
                     lambda: client.put(server.url, self.ids[2], self.chunks[self.ids[2]])):
            error = self.assertRaises(exception.PeerError, call)
            self.assertIn('HTTP 503', error.reason)
            self.assertIn('stopping', error.reason)
        client.persisted(server.url, [self.ids[0]])  # a hint a closed cache passes over
        self.assertNotIn('Traceback', logs.output)
        self.assertNotIn('ERROR', logs.output)
        self.assertEqual([self.ids[0]], self.exchange.reads)


class SharedTokenCheckTest(base.TestCase):
    def test_the_peer_protocol_imports_no_aiohttp(self):
        # The token check is the warehouse service's, without its server stack.
        result = subprocess.run(
            [sys.executable, '-c', 'import sys, vmcloud.mirror.peer_http; '
                                   'print("aiohttp" in sys.modules)'],
            capture_output=True, text=True, check=True)
        self.assertEqual('False', result.stdout.strip())
        self.assertIs(peer_http.auth.token_ok,
                      __import__('vmcloud.storage.service.auth', fromlist=['x']).token_ok)
