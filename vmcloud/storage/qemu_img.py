"""qemu-img, run under resource limits because the files it opens are untrusted."""
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Iterator

from oslo_config import cfg

from vmcloud import exception


def _command(conf: cfg.ConfigOpts, args: list[str], untrusted: bool) -> list[str]:
    qemu_img = shutil.which('qemu-img')
    if qemu_img is None:
        raise exception.StorageError('qemu-img is not installed (Debian package qemu-utils)')
    if not untrusted:
        return [qemu_img, *args]
    return ['prlimit', f'--as={conf.storage.qemu_img_address_space}',
            f'--cpu={conf.storage.qemu_img_cpu_seconds}', '--', qemu_img, *args]


def run(conf: cfg.ConfigOpts, args: list[str], ok_codes: tuple[int, ...] = (0,),
        untrusted: bool = True) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS``, under resource limits if it reads an ``untrusted`` file.

    :raises: StorageError with qemu-img's own message on an unexpected exit code.
    """
    command = _command(conf, args, untrusted)
    # Every glibc malloc arena reserves 64 MiB of address space (one per thread, up to
    # 8 per CPU). With them, a qcow2-to-raw convert needed between 700 MB and the
    # 1 GiB limit and now and then failed to start a thread; with two it runs in 400 MB.
    env = dict(os.environ, MALLOC_ARENA_MAX='2') if untrusted else None
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=conf.storage.qemu_img_cpu_seconds * 2)
    except subprocess.TimeoutExpired as exc:
        raise exception.StorageError(f'qemu-img {args[0]} timed out') from exc
    if result.returncode not in ok_codes:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise exception.StorageError(
            f"qemu-img {args[0]} failed (exit {result.returncode}): "
            f"{message[-1] if message else 'no output'}")
    return result


def info(conf: cfg.ConfigOpts, path: str, fmt: str | None = None) -> dict[str, Any]:
    """qemu-img info; with ``fmt`` None, qemu-img probes the format itself."""
    args = ['info', '--output=json']
    if fmt is not None:
        args += ['-f', fmt]
    return json.loads(run(conf, args + [path]).stdout)


def check(conf: cfg.ConfigOpts, path: str, fmt: str) -> dict[str, Any]:
    # Exit 2 means corruptions and 3 leaked clusters; both still print a report.
    result = run(conf, ['check', '--output=json', '-f', fmt, path], ok_codes=(0, 2, 3))
    return json.loads(result.stdout)


def convert(conf: cfg.ConfigOpts, src: str, src_fmt: str, dst: str, dst_fmt: str,
            untrusted: bool = True) -> None:
    # Writing qcow2 starts enough threads to exceed the address-space limit;
    # callers pass untrusted=False only for raw files the warehouse wrote itself.
    run(conf, ['convert', '-W', '-f', src_fmt, '-O', dst_fmt, src, dst], untrusted=untrusted)


def data_extents(conf: cfg.ConfigOpts, path: str, fmt: str) -> Iterator[tuple[int, int]]:
    """The (offset, length) guest ranges of ``path`` that hold data, from ``qemu-img map``.

    The map of a fragmented image can be far larger than the image file, so it
    is read as qemu-img writes it, one extent per line, never held whole.

    :raises: StorageError if qemu-img fails or writes something else.
    """
    command = _command(conf, ['map', '--output=json', '-f', fmt, path], untrusted=True)
    # stderr goes to a file: a pipe nobody reads until the end could fill and stall it.
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors,
                                   env=dict(os.environ, MALLOC_ARENA_MAX='2'))
        try:
            for line in process.stdout:
                line = line.strip().lstrip(b'[').rstrip(b']').rstrip(b',')
                if not line:
                    continue
                try:
                    extent = json.loads(line)
                    data = bool(extent.get('data'))
                    start, length = int(extent['start']), int(extent['length'])
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise exception.StorageError(
                        f'qemu-img map wrote something unexpected: {line[:200]!r}') from exc
                if data:
                    yield start, length
            if process.wait() != 0:
                errors.seek(0)
                message = errors.read().decode('utf-8', 'replace').strip().splitlines()
                raise exception.StorageError(
                    f"qemu-img map failed (exit {process.returncode}): "
                    f"{message[-1] if message else 'no output'}")
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()


def convert_range(conf: cfg.ConfigOpts, src: str, src_fmt: str, offset: int, length: int,
                  dst: str) -> None:
    """Convert guest bytes ``[offset, offset + length)`` of an untrusted image to raw ``dst``.

    A raw node with offset and size over the image node selects the window;
    the json: filename names every driver, so qemu-img probes nothing.
    """
    spec = {'driver': 'raw', 'offset': offset, 'size': length,
            'file': {'driver': src_fmt, 'file': {'driver': 'file', 'filename': src}}}
    run(conf, ['convert', '-W', '-O', 'raw', 'json:' + json.dumps(spec), dst])
