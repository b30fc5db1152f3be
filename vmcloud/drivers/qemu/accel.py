"""Choosing between KVM and TCG by booting a kernel, not by looking for /dev/kvm.

A nested hypervisor may expose a /dev/kvm on which a stock kernel never boots.
The probe boots the instance's own kernel under KVM and waits for the kernel to
hand over to init; the answer is kept per host boot, since it cannot change
without a reboot.
"""
import json
import logging
import os
import subprocess
import tempfile
import threading

from oslo_config import cfg

from vmcloud import exception
from vmcloud.drivers import base
from vmcloud.drivers import console

LOG = logging.getLogger(__name__)
# Printed by every Linux kernel (without 'quiet') when it starts init.
_INIT_STARTED = r'Run /\S+ as init process'
_lock = threading.Lock()
_answers: dict[str, str] = {}


def _boot_id() -> str:
    with open('/proc/sys/kernel/random/boot_id') as f:
        return f.read().strip()


def _cache_path(conf: cfg.ConfigOpts) -> str:
    return os.path.join(conf.state_path, 'accelerator-probe.json')


def choose(conf: cfg.ConfigOpts, binary: str, spec: base.InstanceSpec) -> str:
    """'kvm' or 'tcg' for ``spec`` on this host, as ``[compute] accelerator`` says."""
    if conf.compute.accelerator != 'auto':
        return conf.compute.accelerator
    key = f'{_boot_id()} {binary}'
    with _lock:
        if key not in _answers:
            _answers[key] = _cached(conf, key) or _probe_and_remember(conf, key, binary, spec)
        return _answers[key]


def _cached(conf: cfg.ConfigOpts, key: str) -> str | None:
    try:
        with open(_cache_path(conf)) as f:
            return json.load(f).get(key)
    except (OSError, ValueError):
        return None


def _probe_and_remember(conf: cfg.ConfigOpts, key: str, binary: str,
                        spec: base.InstanceSpec) -> str:
    if not os.access('/dev/kvm', os.R_OK | os.W_OK):
        answer = 'tcg'
    elif not spec.kernel:
        LOG.warning('cannot probe KVM without a kernel to boot; using TCG')
        return 'tcg'
    else:
        answer = 'kvm' if probe_kvm(binary, spec, conf.compute.accelerator_probe_timeout) \
            else 'tcg'
    LOG.info('accelerator for %s on this host: %s', binary, answer)
    os.makedirs(conf.state_path, exist_ok=True)
    path = _cache_path(conf)
    tmp = f'{path}.{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump({key: answer}, f)
    os.replace(tmp, path)
    return answer


def probe_kvm(binary: str, spec: base.InstanceSpec, timeout: float) -> bool:
    """Whether ``spec``'s kernel reaches init under KVM within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as scratch:
        log = os.path.join(scratch, 'console.log')
        command = [binary, '-machine', 'pc,accel=kvm', '-cpu', 'host', '-nodefaults',
                   '-no-user-config', '-display', 'none', '-m', '256',
                   '-serial', f'file:{log}', '-kernel', spec.kernel,
                   '-append', 'console=ttyS0 panic=-1 no_timer_check']
        if spec.initrd:
            command += ['-initrd', spec.initrd]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            console.wait_for_line(log, _INIT_STARTED, timeout,
                                  lambda: process.poll() is None, 'KVM probe')
            return True
        except exception.GuestTimeout as exc:
            LOG.info('KVM does not boot a guest here (%s)', exc)
            return False
        finally:
            process.kill()
            process.wait()
