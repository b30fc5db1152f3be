"""Issue 18's peer exchange on emulated hosts (tests/multihost/cluster.py): compute nodes
whose chunk caches serve each other, so that the warehouse sends each chunk once.

One cloud for the class: a controller (RabbitMQ, PostgreSQL, warehouse service,
dispatcher) and four compute hosts, node1..node4, each running ``vmcloud
mirror-service`` (its mirrors, its chunk cache and its peer chunk server on its own
address) and ``vmcloud compute``; every chunk has R = 2 owners among the hosts up
(vmcloud.mirror.ownership). Each host fetched the guest's kernel and initrd once,
before any test, as its builds do: what a deploy then takes from the warehouse is
its disk's chunks alone. Every test starts on empty chunk caches (each host's mirror
service restarted on a removed cache, its peer counters from zero) with every host
knowing the same live set, and deletes what it deployed:

- 8 guests on the 4 hosts: the warehouse sends each distinct chunk the hosts hold
  once (not once per host), each host fetched from it exactly the chunks it is the
  primary owner of, the rest crossed between peers.
- An owner that runs no guest of the deploy is killed (SIGKILL, then powered off)
  while it sends a chunk to a peer: no instance fails or is rebuilt, the read goes
  on elsewhere, and every host drops it from its live set in bounded time.
- An owner whose cache disk returns flipped bytes: the reader finds out (sha256
  against the chunk id), skips it, and its guest reads the right bytes.
- A fifth host joins, then leaves: every host learns each live set in bounded time,
  only the chunks whose owners gain (lose) it change hands, and a guest on the new
  host costs the warehouse only the chunks it became the primary owner of.

Needs root, RabbitMQ, PostgreSQL and the test guest (tools/guest/build-test-guest.sh).
"""
import concurrent.futures
import os
import re
import time
from typing import Callable, Iterable

from tests import guest
from tests.multihost import cluster
from tests.multihost import netns
from tests.multihost import test_faults
from vmcloud.conf import mirror as conf_mirror
from vmcloud.mirror import ownership
from vmcloud.storage import manifest as manifest_mod

NODES = ('node1', 'node2', 'node3', 'node4')
REPLICAS = 2
GUESTS = 8
MEMORY_MIB = 128
CMDLINE = f'{guest.CMDLINE} vmcloud.id={{name}}'
IMAGE = ('guest', 1)
BOOT_ARTIFACTS = ('guest-kernel:1', 'guest-initrd:1')
DATA_MD5 = re.compile(r'^VMCLOUD-DATA data\.txt md5 ([0-9a-f]{32})\r?$', re.M)
# How long every host gets to see a change of the live node set: the dispatcher takes
# a silent host for unknown after SERVICE_DOWN_TIME, and each host asks it for the set
# after every heartbeat.
LEARN_TIME = 3 * cluster.SERVICE_DOWN_TIME
# A peer sending this many bytes a second takes 2 s a chunk (256 KiB): a read of it
# is under way long enough for the test to kill the peer in the middle of it.
SLOW_UPLOAD_RATE = 128 * 1024


def owners_by_chunk(chunk_ids: Iterable[str], nodes: Iterable[str]) -> dict[str, list[str]]:
    """Each chunk's owners among ``nodes``, the primary first."""
    nodes = list(nodes)
    return {c: ownership.owners(c, nodes, REPLICAS) for c in chunk_ids}


class PeerExchangeTest(test_faults.FaultTestCase):
    """node1..node4 with the peer exchange, R = 2; each test on empty chunk caches."""

    cloud: cluster.Cluster

    @classmethod
    def setUpClass(cls):
        # FaultTestCase's cloud is another; its checks and closing are these tests' too.
        super(test_faults.FaultTestCase, cls).setUpClass()
        if os.geteuid() != 0:
            raise AssertionError('tests.multihost need root (network namespaces); run '
                                 'them as root like the README\'s test command')
        cls.cloud = cluster.Cluster(rate='1gbit', peer_replicas=REPLICAS)
        cls.prefix = f'{netns.PREFIX}-{os.getpid()}-{cls.cloud.network.tag}-'
        try:
            cls.cloud.open()
            cls.cloud.import_guest()
            for name in NODES:
                cls.cloud.add_compute(name)
            # Started side by side: each takes seconds, mostly Python's imports.
            cls.each(cls.cloud.start_mirror_service, NODES)
            cls.each(cls.cloud.start_compute, NODES)
            cls.cloud.wait_host_states({name: 'up' for name in NODES})
            cls.each(lambda name: cls.cloud.fetch_boot_artifacts(name, BOOT_ARTIFACTS), NODES)
            manifest = cls.cloud.manifest(*IMAGE)
            # The image's data chunks and their lengths (the last chunk may be short).
            cls.lengths = {c: manifest.chunk_length(i) for i, c in enumerate(manifest.chunks)
                           if c is not None}
        except BaseException:
            cls.close_cloud()
            raise
        # The hosts up, in every test: a host that joined and left is fenced.
        cls.live = set(NODES)

    @classmethod
    def each(cls, call: Callable[[str], object], names: Iterable[str]) -> list:
        """``call(name)`` for every name at once. :returns: their results, in order."""
        names = list(names)
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            return list(pool.map(call, names))

    def setUp(self):
        super().setUp()
        self.each(self.cloud.wipe_chunk_cache, sorted(self.live))
        self.wait_peers(self.live)

    # -- looking at the hosts ------------------------------------------------------

    def egress(self) -> int:
        """Chunk bytes the warehouse sent since it started."""
        return self.cloud.warehouse_stats()['requests'].get('chunk_get_bytes', 0)

    def stats(self, names: Iterable[str]) -> dict[str, dict]:
        """Each host's peer /v1/stats."""
        return {name: self.cloud.peer_stats(name) for name in sorted(names)}

    def wait_peers(self, nodes: Iterable[str], timeout: float = LEARN_TIME) -> float:
        """Wait until every host of ``nodes`` knows ``nodes`` as the live set.

        :returns: the seconds it took.
        """
        nodes = sorted(nodes)
        started = time.monotonic()
        self.cloud.wait_for(
            f'every host of {nodes} to know them as the live set',
            lambda: {n: sorted(self.cloud.peer_stats(n)['peers']) for n in nodes},
            lambda seen: all(live == nodes for live in seen.values()),
            timeout, 0.2)
        return round(time.monotonic() - started, 1)

    def held_bytes(self, chunk_ids: Iterable[str]) -> int:
        """The bytes of the image's chunks ``chunk_ids``."""
        return sum(self.lengths[c] for c in chunk_ids)

    def assert_cache_true(self, name: str) -> set[str]:
        """Every chunk host ``name``'s cache holds is of the image and hashes to its id.

        :returns: their ids.
        """
        held = self.cloud.cached_chunks(name)
        self.assertLessEqual(set(held), set(self.lengths), f'{name} holds chunks of no image')
        for chunk_id, place in held.items():
            with open(place.path(self.cloud.cache_dir(name)), 'rb') as f:
                f.seek(place.offset)
                data = f.read(place.length)
            self.assertEqual(chunk_id, manifest_mod.chunk_id(data),
                             f'{name} keeps wrong bytes for chunk {chunk_id}')
            self.assertEqual(self.lengths[chunk_id], place.length, chunk_id)
        return set(held)

    # -- deploying -----------------------------------------------------------------

    def deploy_on(self, count: int, hosts: Iterable[str] | None = None,
                  wait: bool = True) -> dict:
        """``count`` test guests, on ``hosts`` only if given (a cloud of theirs); the
        deployment (and cloud) deleted after the test."""
        cloud = None
        if hosts is not None:
            hosts = sorted(hosts)
            cloud = f'on-{"-".join(hosts)}'
            self.cloud.cli_json('cloud', 'create', cloud, '--connection-limit', '100',
                                *[a for host in hosts for a in ('--host', host)])
            self.addCleanup(self.cloud.cli_json, 'cloud', 'delete', cloud)
        deployment = self.cloud.deploy(count, CMDLINE, MEMORY_MIB, wait=wait,
                                       timeout=test_faults.DEPLOY_TIMEOUT, cloud=cloud)
        self.addCleanup(self.delete, deployment['id'])
        return deployment

    def booted(self, deployment: dict) -> dict[str, str]:
        """Every instance active, built at its first attempt, its app running and its
        disk's data.txt read right by the guest. :returns: instance name -> host."""
        placed = self.running(deployment)
        with open(guest.path('data.md5')) as f:
            expected = f.read().strip()
        for instance in deployment['instances']:
            self.assertEqual(1, instance['attempts'], instance)
            console = self.cloud.wait_console(instance['host'], instance['name'],
                                              DATA_MD5.pattern, test_faults.DEPLOY_TIMEOUT)
            self.assertEqual([expected], DATA_MD5.findall(console), instance['name'])
        return placed

    def assert_settled(self) -> None:
        """The live hosts up, no instance transient, nothing orphaned or paused."""
        self.cloud.wait_host_states({name: 'up' for name in self.live}, test_faults.SETTLE)
        for listed in self.cloud.cli_json('list'):
            if listed['state'] != 'deleted':
                self.wait_deployment(listed['id'], test_faults.SETTLE)
        self.assertEqual([], self.cloud.wait_no_problems())

    # -- the tests -------------------------------------------------------------------

    def test_4_hosts_boot_one_image_the_warehouse_sends_each_chunk_once(self):
        before = self.egress()
        deployment = self.deploy_on(GUESTS)
        placed = self.booted(deployment)
        self.assertEqual(set(NODES), set(placed.values()), placed)
        egress = self.egress() - before

        held = {name: self.assert_cache_true(name) for name in NODES}
        distinct = set().union(*held.values())
        self.assertTrue(distinct)
        # Each distinct chunk once: not once per host that holds it.
        self.assertEqual(self.held_bytes(distinct), egress)
        stats = self.stats(NODES)
        self.assertEqual(egress, sum(s['repository_bytes'] for s in stats.values()), stats)
        self.assertGreater(sum(s['peer_bytes'] for s in stats.values()), 0, stats)
        owners = owners_by_chunk(distinct, NODES)
        for name in NODES:
            # Each host read from the warehouse the chunks it is the primary of, no other.
            primary = {c for c in distinct if owners[c][0] == name}
            self.assertEqual(self.held_bytes(primary), stats[name]['repository_bytes'], name)
            self.assertLessEqual(primary, held[name], name)
            self.assertEqual(0, stats[name]['peer_failures'], name)
        self.measured.update({
            'warehouse egress (bytes)': egress,
            'distinct chunks held (bytes)': self.held_bytes(distinct),
            'held by the hosts together (bytes)': sum(map(self.held_bytes, held.values())),
            'between peers (bytes)': sum(s['peer_bytes'] for s in stats.values()),
            'placed': placed})
        self.assert_settled()

    def touched(self) -> set[str]:
        """The image's chunks a boot of the test guest reads, from one probe boot on
        node1 (once for the class): which hosts own them depends on the chunk ids, and
        so on the guest image this machine built, so the tests choose their faulty
        host from these."""
        cls = type(self)
        if getattr(cls, 'touched_by_a_boot', None) is None:
            deployment = self.cloud.deploy(1, CMDLINE, MEMORY_MIB,
                                           timeout=test_faults.DEPLOY_TIMEOUT)
            try:
                self.booted(deployment)
                cls.touched_by_a_boot = set().union(
                    *(self.cloud.cached_chunks(n) for n in sorted(self.live)))
            finally:
                self.delete(deployment['id'])
            self.each(self.cloud.wipe_chunk_cache, sorted(self.live))
            self.wait_peers(self.live)
        self.assertTrue(cls.touched_by_a_boot, 'the probe boot read no chunk')
        return cls.touched_by_a_boot

    def busiest_primary(self, chunk_ids: Iterable[str], among: Iterable[str]) -> str:
        """The host of ``among`` that is the primary owner of most of ``chunk_ids``."""
        owners = owners_by_chunk(chunk_ids, sorted(self.live))
        among = sorted(among)
        counts = {n: sum(1 for o in owners.values() if o[0] == n) for n in among}
        chosen = max(among, key=lambda n: (counts[n], n))
        self.assertGreater(counts[chosen], 0, f'none of {among} is the primary owner of a '
                           f'chunk a boot reads: {owners}')
        return chosen

    def test_a_peer_killed_mid_deploy_costs_no_instance(self):
        # A host that is the first one asked for some chunk the guests read.
        victim = self.busiest_primary(self.touched(), NODES)
        readers = tuple(n for n in NODES if n != victim)
        # Slow to send, so that the test kills it in the middle of a read of it.
        self.cloud.stop(f'mirrors-{victim}')
        self.cloud.set_options(victim, {'mirror': {'peer_upload_rate': SLOW_UPLOAD_RATE}})
        self.addCleanup(self.restart_node, victim)
        self.cloud.restart(f'mirrors-{victim}')
        self.wait_peers(self.live)

        egress = self.egress()
        deployment = self.deploy_on(len(readers), readers, wait=False)
        self.cloud.wait_for(f'a host to read a chunk of {victim}',
                            lambda: self.readers_of(victim), bool,
                            test_faults.DEPLOY_TIMEOUT, 0.05)
        # A power cut: nothing of it stops gracefully.
        self.cloud.kill(f'mirrors-{victim}')
        self.cloud.kill(f'compute-{victim}')
        self.cloud.stop_node(victim)

        self.measured['every reader dropped it after (s)'] = self.wait_peers(readers)
        settled = self.wait_deployment(deployment['id'])
        placed = self.booted(settled)
        self.assertLessEqual(set(placed.values()), set(readers), placed)
        egress = self.egress() - egress
        stats = self.stats(readers)
        # The read it broke went on elsewhere, and so did every one after it.
        self.assertGreaterEqual(sum(s['peer_failures'] for s in stats.values()), 1, stats)
        held = set().union(*(self.assert_cache_true(name) for name in readers))
        # Its journal outlives it: what it had fetched (and so was serving) when it died.
        lost = set(self.cloud.cached_chunks(victim))
        # Every chunk the living hold came from the warehouse through one of them, or
        # through the dead host before it died.
        living = sum(s['repository_bytes'] for s in stats.values())
        self.assertGreaterEqual(living + self.held_bytes(lost), self.held_bytes(held))
        # Each once: a chunk the dead host was the primary owner of went to its other
        # owner, which fetched it once for all; only a reader that found that owner
        # asking the dead host for it too fetched it itself.
        owners = owners_by_chunk(held, NODES)
        theirs = {c for c in held if owners[c][0] == victim}
        self.assertLessEqual(living, self.held_bytes(held - theirs)
                             + len(readers) * self.held_bytes(theirs))
        # The warehouse sent them that, and the dead host what it journaled and what it
        # was fetching when it died (which no host counts).
        self.assertGreaterEqual(egress, living + self.held_bytes(lost))
        self.measured.update({
            'peer failures': {n: s['peer_failures'] for n, s in stats.items()},
            'warehouse egress; to the living; journaled by the dead (bytes)': [
                egress, living, self.held_bytes(lost)]})
        self.cloud.wait_host_states({victim: 'unknown'}, test_faults.SETTLE)

    def readers_of(self, name: str) -> set[str]:
        """The addresses of the compute hosts connected to host ``name``'s peer chunk
        server now (not the controller's: the test's own requests)."""
        out = self.cloud.computes[name].run(
            ['ss', '-Htn', 'state', 'established', 'sport', '=', f':{cluster.PEER_PORT}']).stdout
        found = {line.split()[-1].rpartition(':')[0] for line in out.splitlines()}
        return found - {self.cloud.controller.address}

    def restart_node(self, name: str) -> None:
        """Host ``name`` powered on again with the default peer upload rate, up."""
        default = next(o.default for o in conf_mirror.mirror_opts
                       if o.name == 'peer_upload_rate')
        self.cloud.set_options(name, {'mirror': {'peer_upload_rate': default}})
        for service in (f'compute-{name}', f'mirrors-{name}'):
            if service in self.cloud.services:
                self.cloud.stop(service)
        self.cloud.start_compute(name)
        self.cloud.wait_host_states({name: 'up'}, test_faults.SETTLE)

    def test_a_peer_serving_corrupt_bytes_is_detected_and_skipped(self):
        reader = 'node1'
        # The first owner the reader asks for some chunk its guest reads.
        liar = self.busiest_primary(self.touched(), set(NODES) - {reader})
        owned = sorted(c for c, owners in owners_by_chunk(self.lengths, NODES).items()
                       if liar in owners)
        self.assertTrue(owned, f'{liar} owns no chunk of the image')
        for chunk_id in owned:
            self.cloud.stage_chunk(liar, chunk_id)
        held = self.cloud.cached_chunks(liar)
        self.assertLessEqual(set(owned), set(held))
        # Its disk returns wrong bytes for every chunk it holds from now on.
        self.cloud.corrupt_cached_chunks(liar, sorted(held))

        deployment = self.deploy_on(1, [reader])
        self.booted(deployment)
        stats = self.stats(self.live)
        self.assertGreater(stats[reader]['corrupt_from_peers'], 0, stats[reader])
        self.assertEqual(0, stats[liar]['corrupt_from_peers'], stats[liar])
        for name in sorted(self.live - {liar}):
            self.assert_cache_true(name)
        self.measured['corrupt answers detected'] = {
            n: s['corrupt_from_peers'] for n, s in stats.items()}
        self.assert_settled()

    def test_a_host_joining_or_leaving_moves_only_its_share_of_ownership(self):
        joining = 'node5'
        old, new = set(self.live), set(self.live) | {joining}
        # The image on its owners among node1..node4 (what `vmcloud image stage` does).
        for chunk_id, owners in sorted(owners_by_chunk(self.lengths, old).items()):
            for owner in owners:
                self.cloud.stage_chunk(owner, chunk_id)
        before = self.stats(old)

        self.cloud.add_compute(joining)
        self.addCleanup(self.fence, joining)
        self.cloud.start_compute(joining)
        self.measured['every host knew the joined host after (s)'] = self.wait_peers(new)
        self.cloud.fetch_boot_artifacts(joining, BOOT_ARTIFACTS)
        # Each with the URL every other one reaches it at.
        urls = {n: self.cloud.peer_url(n) for n in new}
        self.assertEqual({n: urls for n in new},
                         {n: self.cloud.peer_stats(n)['peers'] for n in new})
        was, now = owners_by_chunk(self.lengths, old), owners_by_chunk(self.lengths, new)
        moved = {c for c in self.lengths if was[c] != now[c]}
        self.assertEqual({c for c in self.lengths if joining in now[c]}, moved)
        for chunk_id in moved:
            self.assertEqual({joining}, set(now[chunk_id]) - set(was[chunk_id]), chunk_id)
        self.measured['chunks that moved'] = f'{len(moved)} of {len(self.lengths)}'

        egress = self.egress()
        deployment = self.deploy_on(1, [joining])
        self.booted(deployment)
        egress = self.egress() - egress
        held = self.assert_cache_true(joining)
        primary = {c for c in held if now[c][0] == joining}
        stats = self.stats(new)
        # The new host fetched what it is now the primary of; every other chunk it read
        # was where it had been, on an owner that kept it.
        self.assertEqual(self.held_bytes(primary), stats[joining]['repository_bytes'])
        self.assertEqual(self.held_bytes(held - primary), stats[joining]['peer_bytes'])
        self.assertEqual(stats[joining]['repository_bytes'], egress)
        for name in sorted(old):
            self.assertEqual(before[name]['repository_bytes'],
                             stats[name]['repository_bytes'], name)
        self.measured['from the warehouse, from peers (bytes)'] = [
            stats[joining]['repository_bytes'], stats[joining]['peer_bytes']]

        # It leaves: its chunks go back to the owners they had, which hold them.
        self.delete(deployment['id'])
        self.cloud.stop_node(joining)
        self.measured['every host dropped the host that left after (s)'] = (
            self.wait_peers(old))
        back = owners_by_chunk(self.lengths, old)
        self.assertEqual(moved, {c for c in self.lengths if back[c] != now[c]})
        egress = self.egress()
        for chunk_id, owners in sorted(back.items()):
            for owner in owners:
                self.cloud.stage_chunk(owner, chunk_id)
        self.assertEqual(0, self.egress() - egress)
        self.assert_settled()

    def fence(self, name: str) -> None:
        """Host ``name``, powered off, fenced: out of every later test's live set."""
        if f'compute-{name}' in self.cloud.services:
            self.cloud.stop_node(name)
        self.cloud.wait_host_states({name: 'unknown'}, test_faults.SETTLE)
        self.cloud.cli_json('host', 'fence', name, '--yes')
