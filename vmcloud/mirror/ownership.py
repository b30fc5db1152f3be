"""Which compute nodes own a chunk: rendezvous (highest random weight) hashing.

Every node scores every chunk with a hash of the pair; a chunk's owners are the
``replicas`` nodes that score highest, the first its *primary*. Every node computes
the same owners from the same node set with no coordination, and a node joining or
leaving changes the owner set only of the chunks it gains or loses: about R/K of
them among K nodes, never a reshuffle of the others.
"""
import hashlib
from typing import Iterable

from vmcloud import exception


def score(node: str, chunk_id: str) -> int:
    """The node's weight for the chunk: the first 8 bytes of sha256(node NUL chunk id)."""
    digest = hashlib.sha256(f'{node}\0{chunk_id}'.encode()).digest()
    return int.from_bytes(digest[:8], 'big')


def owners(chunk_id: str, nodes: Iterable[str], replicas: int) -> list[str]:
    """The chunk's owners among ``nodes``, the primary first: the ``replicas`` nodes of
    the highest score, highest first (equal scores in name order); all of them if
    there are fewer.

    :raises: MirrorError if ``replicas`` is not a positive integer.
    """
    check_replicas(replicas)
    ranked = sorted(set(nodes), key=lambda node: (-score(node, chunk_id), node))
    return ranked[:replicas]


def check_replicas(replicas: int) -> None:
    """:raises: MirrorError if ``replicas`` is not a positive integer."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise exception.MirrorError(
            f'a chunk needs at least one owner: replicas must be an integer >= 1, '
            f'not {replicas!r}')
