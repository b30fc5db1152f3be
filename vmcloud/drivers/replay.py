"""The replay driver: instances that replay a recorded block I/O trace against their disk.

An instance runs no guest. ``spawn`` opens its NBD disk (the mirror's URI) with
vmcloud's own NBD client and a thread replays ``[replay] trace`` (doc/replay.md) on
it: the reads, writes, flushes, zeroes and trims a real guest sent while it booted,
with the think time between them scaled by ``[replay] time_scale``, and the guest's
phase markers printed on the instance's console when the trace gets to them. Its
storage behaviour is the real guest's, its CPU nearly nothing: a node can host
dozens (``[replay] host_cpus`` and ``host_memory_mib`` are what it offers).

The trace is played up to its ``shutdown-started`` marker (or its end); the
instance then idles, running, until it is stopped. ``stop`` is the power button:
the instance prints ``shutdown-started``, plays the rest of the trace (the
recorded shutdown's I/O) and powers off. A request the disk fails (EIO from the
mirror, a connection lost, no answer within ``[replay] io_timeout``) crashes the
instance: it is shut down and its console says why.

Think time: the time in the recording during which the guest had no request
outstanding before its next one (a request that overlapped earlier ones has
none). With ``queue_depth`` 1 the requests go one at a time in recorded order;
with more, a request that overlapped earlier ones in the recording is issued
without waiting for them, up to that many at once, each on a connection of its
own. Written data is deterministic per instance and offset.

Capabilities: an NBD disk (no file), console and phase events, pause (no new
request is issued while paused; the ones in flight finish, as a paused guest's
do), the snapshot barrier (freeze: pause, wait for the requests in flight, FLUSH),
the power button, and a kernel to boot directly: kernel, initrd and command line
are checked and then stand for the boot the trace recorded. NICs are taps on their
bridges, made and removed as the qemu driver makes and removes its own
(vmcloud.drivers.tap), so the network agent and the bridge see the ports a guest
has; the replayed guest sends nothing on them (no DHCP, no service): a readiness
check over the network never passes, the marker check does.
"""
import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time

from vmcloud import exception
from vmcloud.conf import replay as replay_conf
from vmcloud.drivers import base
from vmcloud.drivers import console
from vmcloud.drivers import nbd_uri
from vmcloud.drivers import tap
from vmcloud.nbd import client as client_mod
from vmcloud.nbd import trace as trace_mod

LOG = logging.getLogger(__name__)

#: the console's lines of the driver's own, besides the guest's phase markers
REPLAY_PREFIX = 'VMCLOUD-REPLAY'
#: the console line of an instance that replayed its trace up to the shutdown
IDLE = f'{REPLAY_PREFIX} idle: the trace is replayed up to its shutdown'
# How long destroy or a forced stop waits for an instance's threads: they end at
# once unless a request is stuck in the kernel, which aborting the socket ends.
_END_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Step:
    """One item of a replay: a request or a phase marker, and what comes before it."""

    event: trace_mod.Event
    #: seconds the recorded guest spent with nothing outstanding before this item
    think: float
    #: whether it overlapped earlier requests in the recording (so may overlap them again)
    overlaps: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """A trace prepared for replay, shared by every instance that replays it."""

    trace: trace_mod.Trace
    #: up to the trace's shutdown-started marker (or its end)
    running: tuple[Step, ...]
    #: after it: played once the power button is pressed
    shutdown: tuple[Step, ...]


def plan(trace: trace_mod.Trace) -> Plan:
    """Split ``trace`` at its shutdown-started marker and work out each item's think time."""
    steps: list[Step] = []
    busy_until = 0.0    # when the last of the requests so far was answered, in the recording
    last_marker = 0.0
    split = None
    for event in trace.events:
        idle_since = max(busy_until, last_marker)
        if event.op == trace_mod.PHASE:
            if event.marker == base.SHUTDOWN_STARTED and split is None:
                split = len(steps)
                last_marker = max(last_marker, event.ms)
                continue
            steps.append(Step(event, max(0.0, event.ms - idle_since) / 1000, False))
            last_marker = max(last_marker, event.ms)
            continue
        overlaps = event.ms < busy_until
        steps.append(Step(event, 0.0 if overlaps else max(0.0, event.ms - idle_since) / 1000,
                          overlaps))
        busy_until = max(busy_until, event.ms + event.service_ms)
    split = len(steps) if split is None else split
    return Plan(trace, tuple(steps[:split]), tuple(steps[split:]))


def write_data(name: str, offset: int, length: int) -> bytes:
    """What instance ``name`` writes at ``offset``: the same bytes every time, different
    from any other instance's (so their snapshots share nothing by chance)."""
    return hashlib.shake_256(f'{name}:{offset}'.encode()).digest(length)


class _Killed(Exception):
    """The instance is being forced off: its replay ends where it is."""


class _Crashed(Exception):
    """A request failed: the instance crashes."""


class ReplayInstance:
    """One replayed guest: its connections, its replay thread and its console.

    Everything that changes is guarded by ``condition``, which is notified on every
    change (a request done, a console line, pause, power button, power state).
    """

    def __init__(self, spec: base.InstanceSpec, plan_: Plan,
                 clients: list[client_mod.NbdClient], time_scale: float):
        self.spec = spec
        self.plan = plan_
        self.clients = clients
        self.time_scale = time_scale
        self.condition = threading.Condition()
        self.state = base.PowerState.RUNNING
        self.console: list[str] = []
        self.markers: set[str] = set()
        self.paused = False
        self.pressed = False
        self.killed = False
        self.crash: str | None = None
        self.in_flight = 0
        # Which connections have a request in flight; a request goes to the first idle one.
        self._busy = [False] * len(clients)
        #: requests answered, for whoever watches (tests, benchmarks)
        self.done = 0
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in clients]
        self._threads = [threading.Thread(target=self._run, daemon=True,
                                          name=f'replay-{spec.name}')]
        # With several connections a worker each; with one, the replay thread issues itself.
        if len(clients) > 1:
            self._threads += [threading.Thread(target=self._work, args=(index,), daemon=True,
                                               name=f'replay-{spec.name}-{index}')
                              for index in range(len(clients))]

    # -- console ---------------------------------------------------------------------

    def print(self, line: str) -> None:
        with self.condition:
            self.console.append(line)
            if line.startswith(console.MARKER + ' '):
                self.markers.add(line.split(' ', 1)[1])
            self.condition.notify_all()

    # -- the replay thread ---------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        try:
            self._play(self.plan.running, until_pressed=True)
            self._drain()
            if not self._is_pressed():
                self.print(IDLE)
            with self.condition:
                # The trace is over: the guest idles, running, until the power button.
                while not (self.pressed and not self.paused) and not self.killed \
                        and self.crash is None:
                    self.condition.wait()
                self._check()
            self.print(f'{console.MARKER} {base.SHUTDOWN_STARTED}')
            self._play(self.plan.shutdown, until_pressed=False)
            self._drain()
            self._power_off(None)
        except _Killed:
            pass
        except _Crashed:
            self._power_off(self.crash)
        except Exception as exc:  # a replay bug must still leave a shut down instance
            LOG.exception('replay of %s failed', self.spec.name)
            with self.condition:
                self.crash = self.crash or f'internal error: {exc}'
            self._power_off(self.crash)

    def _play(self, steps: tuple[Step, ...], until_pressed: bool) -> None:
        """:raises: _Killed, _Crashed."""
        for step in steps:
            if until_pressed and self._is_pressed():
                return
            if not step.overlaps:
                # In the recording nothing was outstanding here: the guest waited.
                self._drain()
                self.think(step.think * self.time_scale, until_pressed)
                if until_pressed and self._is_pressed():
                    return
            if step.event.op == trace_mod.PHASE:
                self._gate()
                self.print(f'{console.MARKER} {step.event.marker}')
            else:
                self._issue(step.event)

    def _is_pressed(self) -> bool:
        with self.condition:
            return self.pressed and not self.paused

    def _check(self) -> None:
        """Called with the condition held. :raises: _Killed, _Crashed."""
        if self.killed:
            raise _Killed()
        if self.crash is not None:
            raise _Crashed()

    def _gate(self) -> None:
        """Wait while paused. :raises: _Killed, _Crashed."""
        with self.condition:
            while self.paused and not self.killed:
                self.condition.wait()
            self._check()

    def think(self, seconds: float, until_pressed: bool) -> None:
        """The guest computes for ``seconds`` of its own time: a pause stops the clock;
        the power button (while running) or a kill cuts it short."""
        left = seconds
        with self.condition:
            while left > 0 and not self.killed and self.crash is None:
                if until_pressed and self.pressed and not self.paused:
                    return
                if self.paused:
                    self.condition.wait()
                    continue
                started = time.monotonic()
                self.condition.wait(left)
                left -= time.monotonic() - started
            self._check()

    def _drain(self) -> None:
        """Wait until no request is in flight. :raises: _Killed, _Crashed."""
        with self.condition:
            while self.in_flight and not self.killed and self.crash is None:
                self.condition.wait()
            self._check()

    def _issue(self, event: trace_mod.Event) -> None:
        """:raises: _Killed, _Crashed."""
        depth = len(self.clients)
        with self.condition:
            while (self.paused or self.in_flight >= depth) and not self.killed \
                    and self.crash is None:
                self.condition.wait()
            self._check()
            self.in_flight += 1
            index = self._busy.index(False)
            self._busy[index] = True
        if depth == 1:
            self._perform(index, event)
            with self.condition:
                self._check()
        else:
            self._queues[index].put(event)

    def _work(self, index: int) -> None:
        while True:
            event = self._queues[index].get()
            if event is None:
                return
            self._perform(index, event)

    def _perform(self, index: int, event: trace_mod.Event) -> None:
        """One request on connection ``index``; any failure becomes the instance's crash,
        named. Never raises: on a worker's thread an exception would end the thread with
        the request still counted in flight, and the replay would wait for it forever."""
        client = self.clients[index]
        try:
            if event.op == trace_mod.READ:
                client.read(event.offset, event.length)
            elif event.op == trace_mod.WRITE:
                client.write(event.offset, write_data(self.spec.name, event.offset,
                                                      event.length))
            elif event.op == trace_mod.WRITE_ZEROES:
                client.write_zeroes(event.offset, event.length)
            elif event.op == trace_mod.TRIM:
                client.trim(event.offset, event.length)
            else:
                client.flush()
            failure = None
        except client_mod.NbdClientError as exc:
            failure = str(exc)
        except Exception as exc:  # a bug, here or in the client: still the guest's crash
            LOG.exception('replay of %s: request %s failed', self.spec.name, event.line())
            failure = f'internal error in request "{event.line()}": {type(exc).__name__}: {exc}'
        with self.condition:
            self.in_flight -= 1
            self._busy[index] = False
            if failure is None:
                self.done += 1
            elif not self.killed and self.crash is None:
                self.crash = failure
            self.condition.notify_all()

    def _power_off(self, crash: str | None) -> None:
        if crash is not None:
            self.print(f'{REPLAY_PREFIX} I/O error: {crash}')
            self.print(f'{REPLAY_PREFIX} the guest crashed: its disk failed a request')
        self._end_workers()
        for client in self.clients:
            client.close()
        with self.condition:
            self.state = base.PowerState.SHUTDOWN
            self.condition.notify_all()

    def _end_workers(self) -> None:
        if len(self._threads) > 1:
            for worker_queue in self._queues:
                worker_queue.put(None)

    # -- what the driver asks ---------------------------------------------------------

    def kill(self) -> None:
        """Force it off now: requests in flight are cut, the threads end."""
        with self.condition:
            self.killed = True
            self.condition.notify_all()
        for client in self.clients:
            client.abort()
        self._end_workers()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(_END_TIMEOUT)
                if thread.is_alive():
                    LOG.warning('replay thread %s did not end within %g s', thread.name,
                                _END_TIMEOUT)
        for client in self.clients:
            client.close()
        with self.condition:
            self.state = base.PowerState.SHUTDOWN
            self.condition.notify_all()

    def drain_paused(self) -> None:
        """Wait until the requests in flight of a paused instance are answered.

        :raises: DriverError if it crashed or was stopped meanwhile.
        """
        with self.condition:
            while self.in_flight and self.state != base.PowerState.SHUTDOWN:
                self.condition.wait()
            if self.state == base.PowerState.SHUTDOWN or self.crash is not None:
                raise exception.DriverError(f'instance {self.spec.name} went off while its '
                                            f'I/O was drained: {self.crash or "stopped"}')


class ReplayDriver(base.Driver):
    capabilities = (base.Capability.PAUSE | base.Capability.SNAPSHOT_BARRIER
                    | base.Capability.CONSOLE_LOG | base.Capability.PHASE_EVENTS
                    | base.Capability.ACPI_STOP | base.Capability.NBD_DISK
                    | base.Capability.DIRECT_KERNEL_BOOT | base.Capability.BRIDGED_NIC)

    def __init__(self, conf):
        super().__init__(conf)
        # [replay] is a group of vmcloud.conf (listed once, by vmcloud.conf.opts), not
        # the driver's OPTION_GROUP; registering again is harmless for a conf that has it.
        replay_conf.register_opts(conf)
        self.instances: dict[str, ReplayInstance] = {}
        self._lock = threading.Lock()
        self._plans: dict[tuple, Plan] = {}
        self._plans_lock = threading.Lock()

    # -- the trace ---------------------------------------------------------------------

    def load_plan(self) -> Plan:
        """The configured trace, read once per version of the file.

        :raises: SpawnFailed if none is configured or it cannot be read.
        """
        path = self.conf.replay.trace
        if not path:
            raise exception.SpawnFailed('the replay driver has no trace to replay: set '
                                        '[replay] trace')
        try:
            st = os.stat(path)
        except OSError as exc:
            raise exception.SpawnFailed(f'the replay trace {path} cannot be read: '
                                        f'{exc.strerror}') from exc
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._plans_lock:
            found = self._plans.get(key)
            if found is None:
                try:
                    found = plan(trace_mod.read(path))
                except trace_mod.TraceError as exc:
                    raise exception.SpawnFailed(f'the replay trace is unusable: {exc}') from exc
                self._plans = {key: found}    # only the current version is worth keeping
            return found

    # -- lifecycle -----------------------------------------------------------------------

    def _get(self, name: str) -> ReplayInstance:
        with self._lock:
            try:
                return self.instances[name]
            except KeyError:
                raise exception.InstanceNotFound(name) from None

    def _connect(self, spec: base.InstanceSpec, count: int) -> list[client_mod.NbdClient]:
        """:raises: DiskNotFound if the export does not exist; SpawnFailed."""
        uri = nbd_uri.parse(spec.disk)
        clients: list[client_mod.NbdClient] = []
        try:
            for _ in range(count):
                clients.append(client_mod.NbdClient(
                    uri.export, socket_path=uri.socket, host=uri.host, port=uri.port,
                    timeout=self.conf.replay.io_timeout))
        except client_mod.NbdExportNotFound as exc:
            for client in clients:
                client.close()
            raise exception.DiskNotFound(
                f'disk {spec.disk} of instance {spec.name} does not exist: {exc}') from exc
        except client_mod.NbdClientError as exc:
            for client in clients:
                client.close()
            raise exception.SpawnFailed(
                f'instance {spec.name} cannot open its disk {spec.disk}: {exc}') from exc
        return clients

    def spawn(self, spec: base.InstanceSpec) -> None:
        self.validate(spec)
        with self._lock:
            existing = self.instances.get(spec.name)
            if existing is not None and existing.state != base.PowerState.SHUTDOWN:
                raise exception.InstanceExists(spec.name)
        plan_ = self.load_plan()
        clients = self._connect(spec, self.conf.replay.queue_depth)
        trace = plan_.trace
        try:
            if trace.size > clients[0].size:
                raise exception.SpawnFailed(
                    f'instance {spec.name}: the trace {trace.path} is of a disk of '
                    f'{trace.size} bytes, larger than its disk {spec.disk} '
                    f'({clients[0].size} bytes)')
            if clients[0].read_only and any(e.op in (trace_mod.WRITE, trace_mod.WRITE_ZEROES,
                                                     trace_mod.TRIM) for e in trace.events):
                raise exception.SpawnFailed(
                    f'instance {spec.name}: its disk {spec.disk} is read-only and the trace '
                    f'{trace.path} writes')
        except BaseException:
            for client in clients:
                client.close()
            raise
        try:
            self._make_taps(spec)
        except BaseException:
            for client in clients:
                client.close()
            raise
        instance = ReplayInstance(spec, plan_, clients, self.conf.replay.time_scale)
        instance.print(f'{REPLAY_PREFIX} replaying {trace.path}: {len(trace.requests())} '
                       f'requests, queue depth {len(clients)}, time scale '
                       f'{self.conf.replay.time_scale:g}')
        with self._lock:
            self.instances[spec.name] = instance
        instance.start()

    def list_instances(self) -> list[str]:
        with self._lock:
            return sorted(self.instances)

    def power_state(self, name: str) -> base.PowerState:
        return self._get(name).state

    def stop(self, name: str, timeout: float | None = None) -> bool:
        instance = self._get(name)
        timeout = self.conf.compute.stop_timeout if timeout is None else timeout
        with instance.condition:
            if instance.state == base.PowerState.SHUTDOWN:
                return False
            instance.pressed = True
            instance.condition.notify_all()
            went_off = instance.condition.wait_for(
                lambda: instance.state == base.PowerState.SHUTDOWN, timeout)
        if went_off:
            return False
        instance.kill()
        return True

    def destroy(self, name: str) -> None:
        """:raises: InstanceNotFound; DriverError if a tap cannot be removed (the
        instance is then still known, and a second destroy tries again)."""
        instance = self._get(name)
        instance.kill()
        self._delete_taps(name)
        with self._lock:
            if self.instances.get(name) is instance:
                del self.instances[name]

    # -- NICs ------------------------------------------------------------------------------

    def _make_taps(self, spec: base.InstanceSpec) -> None:
        """:raises: SpawnFailed naming the NIC; then no tap of the instance is left."""
        for index, nic in enumerate(spec.nics):
            try:
                tap.create(base.tap_name(spec.name, index), nic.bridge)
            except exception.DriverError as exc:
                try:
                    self._delete_taps(spec.name)
                except exception.DriverError as cleanup:
                    LOG.warning('removing the taps of %s after it failed to spawn failed: %s',
                                spec.name, cleanup)
                raise exception.SpawnFailed(
                    f'cannot attach NIC {index} of instance {spec.name} to bridge '
                    f'{nic.bridge}: {exc}') from exc

    def _delete_taps(self, name: str) -> None:
        """Every tap ``name`` may have, also one a spec with more NICs left under its name.

        :raises: DriverError if one stays.
        """
        for index in range(base.MAX_NICS):
            tap.delete(base.tap_name(name, index))

    # -- console -------------------------------------------------------------------------

    def console_log(self, name: str) -> str:
        instance = self._get(name)
        with instance.condition:
            return '\n'.join(instance.console) + '\n'

    def wait_for_event(self, name: str, event: str, timeout: float) -> None:
        instance = self._get(name)
        deadline = time.monotonic() + timeout
        with instance.condition:
            while event not in instance.markers:
                left = deadline - time.monotonic()
                if instance.state == base.PowerState.SHUTDOWN:
                    reason = 'the guest stopped first'
                elif left <= 0:
                    reason = f'not within {timeout:g} s'
                else:
                    instance.condition.wait(left)
                    continue
                tail = ' | '.join(instance.console[-3:])
                raise exception.GuestTimeout(f'instance {name} did not reach {event}: '
                                             f'{reason}; console ends with: {tail}')

    # -- pause and the snapshot barrier ---------------------------------------------------

    def _set_paused(self, name: str, paused: bool) -> ReplayInstance:
        instance = self._get(name)
        with instance.condition:
            if instance.state == base.PowerState.SHUTDOWN:
                raise exception.DriverError(f'instance {name} is shutdown')
            instance.paused = paused
            instance.state = base.PowerState.PAUSED if paused else base.PowerState.RUNNING
            instance.condition.notify_all()
        return instance

    def pause(self, name: str) -> None:
        self._set_paused(name, True)

    def resume(self, name: str) -> None:
        self._set_paused(name, False)

    def freeze_io(self, name: str) -> None:
        # Paused, no new request is issued; once those in flight are answered, a FLUSH
        # makes every write before it durable.
        instance = self._set_paused(name, True)
        instance.drain_paused()
        try:
            instance.clients[-1].flush()   # any: none has a request in flight now
        except client_mod.NbdClientError as exc:
            raise exception.DriverError(f'the flush of instance {name}\'s disk failed: '
                                        f'{exc}') from exc

    def thaw_io(self, name: str) -> None:
        self.resume(name)

    def host_capacity(self) -> base.HostCapacity:
        measured = base.host_capacity(self.conf.compute.instances_path)
        return base.HostCapacity(cpus=self.conf.replay.host_cpus,
                                 memory_mib=self.conf.replay.host_memory_mib,
                                 free_disk_bytes=measured.free_disk_bytes)
