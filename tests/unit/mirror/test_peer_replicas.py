"""The replica half of the peer protocol over real loopback sockets: PUT a chunk (an
unpersisted replica: checked, kept, refused when the budget is full), POST persisted."""
import os

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import peer_http
from tests.unit.mirror import test_peer_http

CHUNK = test_peer_http.CHUNK


class ReplicaRequestTest(test_peer_http.PeerTestCase):
    def test_a_put_chunk_is_kept_as_a_replica_of_its_origin(self):
        server = self.serve()
        client = self.client()
        for chunk_id in self.ids[:2]:
            client.put(server.url, chunk_id, self.chunks[chunk_id], origin='node2')
        self.assertEqual({chunk_id: 'node2' for chunk_id in self.ids[:2]},
                         self.cache.unpersisted())
        # Served from there, the repository never asked.
        self.assertBytesEqual(self.chunks[self.ids[0]], client.get(server.url, self.ids[0]))
        self.assertEqual([], self.exchange.reads)
        self.assertEqual(1, len(client._idle[server.url]))  # one keep-alive connection

    def test_persisted_makes_them_ordinary_entries(self):
        server = self.serve()
        client = self.client()
        for chunk_id in self.ids:
            client.put(server.url, chunk_id, self.chunks[chunk_id])
        client.persisted(server.url, self.ids[:3] + ['f' * 64])
        self.assertEqual([self.ids[3]], list(self.cache.unpersisted()))

    def test_persisted_goes_in_batches(self):
        server = self.serve()
        client = self.client()
        self.patch(peer_http, 'PERSISTED_BATCH', 2)
        requests = []
        mark = self.cache.mark_persisted
        self.patch(self.cache, 'mark_persisted', lambda ids: requests.append(ids) or mark(ids))
        for chunk_id in self.ids:
            client.put(server.url, chunk_id, self.chunks[chunk_id])
        client.persisted(server.url, self.ids)
        self.assertEqual([self.ids[:2], self.ids[2:]], requests)
        self.assertEqual({}, self.cache.unpersisted())

    def test_bytes_that_are_not_the_chunk_are_refused_422(self):
        server = self.serve()
        error = self.assertRaises(exception.PeerError, self.client().put, server.url,
                                  self.ids[0], self.chunks[self.ids[1]])
        self.assertIn('HTTP 422', error.reason)
        self.assertEqual({}, self.cache.unpersisted())

    def test_a_full_budget_is_refused_507_and_the_connection_serves_on(self):
        self.cache.close()
        self.cache = cache_mod.ChunkCache(os.path.join(self.tmp, 'small'), 1 << 30,
                                          self.exchange.fetch, replica_size=CHUNK)
        self.addCleanup(self.cache.close)
        server = self.serve()
        client = self.client()
        client.put(server.url, self.ids[0], self.chunks[self.ids[0]])
        error = self.assertRaises(exception.PeerError, client.put, server.url, self.ids[1],
                                  self.chunks[self.ids[1]])
        self.assertIn('HTTP 507', error.reason)
        self.assertIn('replica_size', error.reason)
        self.assertBytesEqual(self.chunks[self.ids[0]], client.get(server.url, self.ids[0]))

    def test_a_put_needs_the_token(self):
        server = self.serve(token='s3cret')
        error = self.assertRaises(exception.PeerError, self.client().put, server.url,
                                  self.ids[0], self.chunks[self.ids[0]])
        self.assertIn('HTTP 401', error.reason)
        self.client('s3cret').put(server.url, self.ids[0], self.chunks[self.ids[0]])
        self.assertEqual([self.ids[0]], list(self.cache.unpersisted()))

    def test_malformed_requests_are_refused_by_name(self):
        server = self.serve()
        chunk = self.ids[0]
        for request, status in (
                (f'PUT /v1/chunks/{chunk} HTTP/1.1\r\nContent-Length: x\r\n\r\n', 400),
                (f'PUT /v1/chunks/{chunk} HTTP/1.1\r\nContent-Length: '
                 f'{64 * 1024 ** 2 + 1}\r\n\r\n', 413),
                ('POST /v1/chunks/persisted HTTP/1.1\r\nContent-Length: 5\r\n\r\n[1, 2',
                 400),
                ('POST /v1/chunks/persisted HTTP/1.1\r\nContent-Length: 7\r\n\r\n["nope"]'[:-1],
                 400),
                (f'PUT /v1/chunks/{chunk} HTTP/1.1\r\nContent-Length: 1\r\n'
                 f'{peer_http.ORIGIN_HEADER}: ../x\r\n\r\nx', 400),
                ('PUT /v1/chunks/persisted HTTP/1.1\r\n\r\n', 405)):
            got, _response, body = test_peer_http.raw_request(server.url, request.encode())
            self.assertEqual(status, got, request[:70])
            self.assertIn(test_peer_http.error_of(body), ('RequestRefused', 'InvalidName'))
        self.assertEqual({}, self.cache.unpersisted())

    def test_the_client_refuses_a_malformed_id_before_any_request(self):
        client = self.client()
        self.assertRaises(exception.InvalidName, client.put, 'http://127.0.0.1:9', 'x', b'')
        self.assertRaises(exception.InvalidName, client.persisted, 'http://127.0.0.1:9',
                          [self.ids[0], 'x'])
