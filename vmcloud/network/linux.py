"""What the network agent asks of the machine: commands (ip, bridge, dnsmasq) run with a
timeout, and the processes it finds and signals. One small interface, so that unit tests
substitute a recording fake for all of it."""
import contextlib
import fcntl
import os
import signal
import subprocess
import tempfile
from typing import Iterator, Sequence

from vmcloud import exception

# Where the locks of network namespaces live (a tmpfs, so none outlives a boot).
LOCK_DIR = '/run/lock'

# ip and bridge return in milliseconds unless the kernel is stuck; dnsmasq daemonises at once.
COMMAND_TIMEOUT = 30.0


class Runner:
    def run(self, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``argv`` and wait for it; its stdout.

        :raises: NetworkError naming the command and its stderr if it cannot start,
            fails or outlives ``timeout``.
        """
        command = ' '.join(argv)
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise exception.NetworkError(f'{command} ran longer than {timeout:g} s') from exc
        except OSError as exc:
            raise exception.NetworkError(f'{command} cannot run: {exc}') from exc
        if done.returncode != 0:
            raise exception.NetworkError(
                f'{command} failed ({done.returncode}): '
                f'{(done.stderr.strip() or done.stdout.strip())[-2000:]}')
        return done.stdout

    def processes(self) -> Iterator[tuple[int, list[str]]]:
        """(pid, argv) of every live process but zombies."""
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            argv = self.cmdline(int(entry))
            if argv:
                yield int(entry), argv

    def cmdline(self, pid: int) -> list[str] | None:
        """The argv of ``pid``; None if it is gone or a zombie (which has none)."""
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                raw = f.read()
        except OSError:
            return None
        return [a.decode('utf-8', 'replace') for a in raw.split(b'\0') if a] or None

    def kill(self, pid: int, signum: int = signal.SIGTERM) -> bool:
        """Send ``signum`` to ``pid``; False if it is gone."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return False
        return True

    def disable_ipv6(self, device: str) -> None:
        """No IPv6 on ``device`` of this namespace: a bridge or port that is up would
        otherwise get a link-local address, and guests could reach the host over it.
        Nothing to do (no error) on a kernel without IPv6."""
        try:
            with open(f'/proc/sys/net/ipv6/conf/{device}/disable_ipv6', 'w') as f:
                f.write('1')
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise exception.NetworkError(f'cannot disable IPv6 on {device}: {exc}') from exc

    def ipv4_conf(self, device: str, settings: dict[str, int]) -> None:
        """Write ``settings`` (name -> value) to ``device``'s IPv4 settings in this
        namespace (/proc/sys/net/ipv4/conf/<device>/<name>).

        :raises: NetworkError naming the setting that cannot be written.
        """
        for name, value in settings.items():
            path = f'/proc/sys/net/ipv4/conf/{device}/{name}'
            try:
                with open(path, 'w') as f:
                    f.write(str(value))
            except OSError as exc:
                raise exception.NetworkError(f'cannot set {name} of {device} to {value}: '
                                             f'{exc}') from exc

    @contextlib.contextmanager
    def namespace_lock(self) -> Iterator[None]:
        """Hold the lock of this process's network namespace: agents of different state
        directories whose devices share it take it around their changes.

        The lock file is named by the namespace's inode (the same for every process in
        it, different for every live namespace); a file left by a namespace long gone
        holds nothing, so one whose inode is reused is harmless.

        :raises: NetworkError if the lock file cannot be opened.
        """
        try:
            inode = os.stat('/proc/self/ns/net').st_ino
            directory = LOCK_DIR if os.path.isdir(LOCK_DIR) else tempfile.gettempdir()
            lock = open(os.path.join(directory, f'vmcloud-network-netns-{inode}.lock'), 'a')
        except OSError as exc:
            raise exception.NetworkError(
                f'cannot open the lock of this network namespace: {exc}') from exc
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
