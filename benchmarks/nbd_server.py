"""NBD server read throughput from a warm page cache: ours and nbdkit's python plugin vs qemu-nbd.

    .venv/bin/python benchmarks/nbd_server.py [--size MIB] [--repeat N] [--quick]

Three servers serve the same raw file of random data over a unix socket,
read-only: vmcloud's NbdServer with a FileDevice (pread into reused buffers,
in its thread pool); ``qemu-nbd -f raw -r --shared=0 --cache=writeback
--aio=threads`` (pread through the host page cache in qemu's thread pool, the
same kind of I/O); and nbdkit with a python plugin doing preadv, the other way
to serve a Python device (nbdkit's C protocol code, Python for the data).
Read-only exports make qemu-nbd advertise multi-conn as the others do, so
clients pick the same number of connections for all.

Clients copy the whole export to nowhere: ``nbdcopy ... null:`` with its
default connections (one per CPU when the server allows multi-conn) and with
one connection, and ``qemu-img convert`` to a null-co target. Rounds alternate
the order of the servers; the file is read into the page cache before each run.
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from vmcloud.nbd import file_device  # noqa: E402
from vmcloud.nbd import server as server_mod  # noqa: E402

MIB = 1024 * 1024
OURS = 'vmcloud NbdServer'
QEMU = 'qemu-nbd'
NBDKIT = 'nbdkit python plugin'
SERVERS = (OURS, QEMU, NBDKIT)

# The alternative to our own server: nbdkit does the protocol in C and calls
# Python for the data, one pread per request, in parallel threads.
NBDKIT_PLUGIN = """
import os
import nbdkit

API_VERSION = 2
path = None


def config(key, value):
    global path
    path = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return os.open(path, os.O_RDONLY)


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def can_multi_conn(fd):
    return True


def pread(fd, buf, offset, flags):
    os.preadv(fd, [buf], offset)
"""


def build_image(path: str, size_mib: int) -> None:
    with open(path, 'wb') as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))


def warm(path: str) -> None:
    """Read the file so that every run is served from the page cache."""
    with open(path, 'rb', buffering=0) as f:
        buffer = bytearray(16 * MIB)
        while f.readinto(buffer):
            pass


def wait_for_socket(path: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f'{process.args[0]} did not create {path}')
        time.sleep(0.05)


def clients(size: int) -> dict[str, Callable[[str], list[str]]]:
    """Client label -> the command that copies the export at a URI to nowhere."""
    return {
        'nbdcopy (default connections)': lambda uri: ['nbdcopy', uri, 'null:'],
        'nbdcopy --connections=1': lambda uri: ['nbdcopy', '--connections=1', uri, 'null:'],
        'qemu-img convert': lambda uri: [
            'qemu-img', 'convert', '-n', '-f', 'raw', uri,
            '--target-image-opts', f'driver=null-co,size={size}'],
    }


def measure_warm(commands: dict[str, list[str]], image: str, repeat: int) -> dict[str, float]:
    """Median wall time of each command, rounds rotating the order, page cache warm."""
    def run(name: str) -> float:
        warm(image)
        return common.timed(lambda: subprocess.run(commands[name], check=True,
                                                   capture_output=True))

    times = common.rotate(list(commands), repeat, run)
    return {name: statistics.median(values) for name, values in times.items()}


def throughput(work: str, size: int, repeat: int) -> list:
    image = os.path.join(work, 'image.raw')
    ours_socket = os.path.join(work, 'vmcloud.sock')
    qemu_socket = os.path.join(work, 'qemu.sock')
    nbdkit_socket = os.path.join(work, 'nbdkit.sock')
    plugin = os.path.join(work, 'plugin.py')
    with open(plugin, 'w') as f:
        f.write(NBDKIT_PLUGIN)
    qemu = subprocess.Popen(
        ['qemu-nbd', '-f', 'raw', '-r', '--shared=0', '--cache=writeback', '--aio=threads',
         '-x', 'disk', '-k', qemu_socket, '-t', image],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nbdkit = subprocess.Popen(
        ['nbdkit', '--foreground', '-r', '-e', 'disk', '-U', nbdkit_socket,
         'python', plugin, f'file={image}'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        wait_for_socket(qemu_socket, qemu)
        wait_for_socket(nbdkit_socket, nbdkit)
        with file_device.FileDevice(image, read_only=True) as device, \
                server_mod.NbdServer() as server:
            server.add_export('disk', device)
            server.listen_unix(ours_socket)
            uris = {OURS: f'nbd+unix:///disk?socket={ours_socket}',
                    QEMU: f'nbd+unix:///disk?socket={qemu_socket}',
                    NBDKIT: f'nbd+unix:///disk?socket={nbdkit_socket}'}
            for label, command in clients(size).items():
                times = measure_warm({name: command(uri) for name, uri in uris.items()},
                                     image, repeat)
                for name in SERVERS:
                    rows.append((label, name, f'{times[name]:.3f}',
                                 f'{size / times[name] / MIB:.0f}',
                                 f'{times[QEMU] / times[name]:.2f}'))
    finally:
        for process in (qemu, nbdkit):
            process.terminate()
            process.wait()
    return rows


def main() -> None:
    args = common.size_arguments(__doc__.splitlines()[0])
    work = tempfile.mkdtemp(dir=args.workdir)
    try:
        build_image(os.path.join(work, 'image.raw'), args.size)
        facts = common.machine()
        facts['page cache dropped between runs'] = 'no: warm on purpose, re-read before each run'
        qemu_nbd = subprocess.run(['qemu-nbd', '--version'], capture_output=True, text=True)
        nbdcopy = subprocess.run(['nbdcopy', '--version'], capture_output=True, text=True)
        nbdkit = subprocess.run(['nbdkit', '--version'], capture_output=True, text=True)
        facts.update({
            'image': f'{args.size} MiB raw file of random data, fully allocated',
            'qemu-nbd': qemu_nbd.stdout.splitlines()[0],
            'nbdcopy': nbdcopy.stdout.splitlines()[0],
            'nbdkit': nbdkit.stdout.splitlines()[0],
            'rounds': str(args.repeat)})
        rows = throughput(work, args.size * MIB, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speed = common.table(('client', 'server', 'seconds', 'MiB/s',
                          'speed / qemu-nbd speed'), rows)
    print(common.table(('fact', 'value'), list(facts.items())))
    print(f'\nRead throughput, warm page cache\n{speed}')
    path = common.write_results('nbd_server', 'NBD server benchmark', [
        ('Read throughput, warm page cache',
         'Median of the rounds, servers alternating. The last column is qemu-nbd\'s time '
         'divided by the server\'s: 0.80 means 0.8x the speed of qemu-nbd. Both servers '
         'serve the file read-only, which makes qemu-nbd advertise multi-conn as ours '
         'always does; all read it with buffered pread in a thread pool '
         '(`--cache=writeback --aio=threads` on the qemu-nbd side, the parallel thread '
         'model for nbdkit).\n\n' + speed),
    ], facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
