"""Chunk ownership by rendezvous hashing: stable, R distinct owners, few moves when a
node joins or leaves. (test_ownership.py is about who owns the node's state files.)"""
import hashlib

import testtools

from vmcloud import exception
from vmcloud.mirror import ownership

CHUNKS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]


def owner_sets(nodes: list[str], replicas: int) -> dict[str, list[str]]:
    return {c: ownership.owners(c, nodes, replicas) for c in CHUNKS}


class OwnersTest(testtools.TestCase):
    NODES = [f'compute-{i}' for i in range(8)]

    def test_the_score_is_the_contract_hash(self):
        # Every node (and the staging command) must rank alike: the formula is the contract.
        chunk = CHUNKS[0]
        digest = hashlib.sha256(b'compute-3\0' + chunk.encode()).digest()
        self.assertEqual(int.from_bytes(digest[:8], 'big'), ownership.score('compute-3', chunk))
        ranked = sorted(self.NODES, key=lambda n: ownership.score(n, chunk), reverse=True)
        self.assertEqual(ranked[:2], ownership.owners(chunk, self.NODES, 2))

    def test_stable_whatever_the_order_of_the_nodes(self):
        first = owner_sets(self.NODES, 2)
        self.assertEqual(first, owner_sets(list(reversed(self.NODES)), 2))
        self.assertEqual(first, owner_sets(self.NODES + self.NODES[:3], 2))  # repeats count once

    def test_r_distinct_owners_and_every_node_owns_its_share(self):
        sets = owner_sets(self.NODES, 3)
        self.assertTrue(all(len(set(owners)) == 3 for owners in sets.values()))
        primaries = [owners[0] for owners in sets.values()]
        for node in self.NODES:
            # 4000 chunks / 8 nodes = 500 each as primary; a hash is not a perfect dealer.
            self.assertGreater(primaries.count(node), 380, node)
            self.assertLess(primaries.count(node), 620, node)

    def test_a_longer_list_starts_with_the_shorter_one(self):
        # The primary of R = 1 is the primary of R = 2: more replicas add owners, move none.
        for chunk in CHUNKS[:200]:
            self.assertEqual(ownership.owners(chunk, self.NODES, 1),
                             ownership.owners(chunk, self.NODES, 2)[:1])

    def assertOnlyTheirShareMoved(self, small: list[str], large: list[str], node: str) -> None:
        """From ``small`` to ``large`` (``small`` plus ``node``) only chunks that gain
        ``node`` change owners, each losing one owner for it; about R/K of them."""
        before, after = owner_sets(small, 2), owner_sets(large, 2)
        moved = [c for c in CHUNKS if set(before[c]) != set(after[c])]
        for chunk in moved:
            self.assertIn(node, after[chunk])
            self.assertEqual(1, len(set(before[chunk]) - set(after[chunk])))
        for chunk in set(CHUNKS) - set(moved):
            self.assertNotIn(node, after[chunk])
        expected = len(CHUNKS) * 2 / len(large)  # R/K of the chunks
        self.assertGreater(len(moved), 0.8 * expected)
        self.assertLess(len(moved), 1.2 * expected)

    def test_a_node_joining_takes_only_its_share(self):
        self.assertOnlyTheirShareMoved(self.NODES, self.NODES + ['compute-new'], 'compute-new')

    def test_a_node_leaving_gives_up_only_its_share(self):
        self.assertOnlyTheirShareMoved(self.NODES[1:], self.NODES, self.NODES[0])

    def test_fewer_nodes_than_replicas(self):
        chunk = CHUNKS[1]
        self.assertEqual(['a'], ownership.owners(chunk, ['a'], 2))
        self.assertEqual(sorted(['a', 'b']), sorted(ownership.owners(chunk, ['b', 'a'], 3)))
        self.assertEqual([], ownership.owners(chunk, [], 2))

    def test_equal_scores_go_by_name(self):
        self.patch(ownership, 'score', lambda node, chunk_id: 7)
        self.assertEqual(['a', 'b'], ownership.owners(CHUNKS[0], ['c', 'b', 'a'], 2))

    def test_replicas_below_one_are_refused_by_name(self):
        for bad in (0, -1, 1.5, True, '2'):
            error = self.assertRaises(exception.MirrorError, ownership.owners, CHUNKS[0],
                                      self.NODES, bad)
            self.assertIn('replicas must be an integer >= 1', str(error))
