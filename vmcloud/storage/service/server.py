"""Run the warehouse app on an event loop of its own thread; start, URL, stop.

Used by ``vmcloud warehouse`` and by tests, which run a service in-process.
"""
import asyncio
import logging
import ssl
import threading

from aiohttp import web
from oslo_config import cfg

from vmcloud import exception
from vmcloud.conf import warehouse as warehouse_conf
from vmcloud.storage import backend as backend_mod
from vmcloud.storage.service import app as app_mod
from vmcloud.storage.service import leases as leases_mod

LOG = logging.getLogger(__name__)

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


def ssl_context(cert_file: str | None, key_file: str | None) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP.

    :raises: ConfigError if only one of the two is set, or they cannot be loaded.
    """
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise exception.ConfigError(
            '[warehouse_service] cert_file and key_file must be set together')
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise exception.ConfigError(
            f'cannot load TLS certificate {cert_file} with key {key_file}: {exc}') from exc
    return context


class WarehouseServer:
    """The service over ``backend`` (default: the one ``[storage] backend`` names)."""

    def __init__(self, conf: cfg.ConfigOpts, backend: backend_mod.Backend | None = None):
        warehouse_conf.register_opts(conf)
        self.conf = conf
        opts = conf.warehouse_service
        self._ssl = ssl_context(opts.cert_file, opts.key_file)
        if backend is None:
            if conf.storage.backend == 'http':
                raise exception.ConfigError(
                    'the warehouse service cannot serve [storage] backend = http: '
                    'that is its own client; name the store it serves (file, rados)')
            backend = backend_mod.load(conf)
        self.backend = backend
        self.leases = leases_mod.LeaseTable(backend, max_ttl=opts.max_lease_ttl)
        self.app = app_mod.WarehouseApp(backend, self.leases, opts.token,
                                        opts.allow_anonymous_reads, opts.threads)
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task | None = None

    def start(self) -> str:
        """Listen and serve in a background thread.

        :returns: the URL served, e.g. ``https://127.0.0.1:9494``.
        :raises: StorageError if the address cannot be listened on.
        """
        started = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:  # noqa: B902 - handed to start()
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name='warehouse-service', daemon=True)
        self._thread.start()
        if not started.wait(_START_TIMEOUT):
            raise exception.StorageError('the warehouse service did not start in '
                                         f'{_START_TIMEOUT:g} s')
        if failure:
            self._thread.join(_STOP_TIMEOUT)
            opts = self.conf.warehouse_service
            error = failure[0]
            raise exception.StorageError(
                f'cannot serve the warehouse on {opts.host}:{opts.port}: '
                f'{getattr(error, "strerror", None) or error}') from error
        return self.url

    async def _listen(self) -> None:
        opts = self.conf.warehouse_service
        self._runner = web.AppRunner(self.app.app, access_log=None,
                                     handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, opts.host, opts.port, ssl_context=self._ssl,
                           reuse_address=True)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        scheme = 'https' if self._ssl else 'http'
        self.url = f'{scheme}://{f"[{host}]" if ":" in host else host}:{port}'
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        # Often enough that a lease ends within a fraction of its TTL after it is due.
        interval = max(leases_mod.MIN_TTL / 2, 0.1)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.app.call(self.leases.expire_due)
            except Exception:  # noqa: B902 - the reaper must keep running
                LOG.exception('expiring leases failed')

    def stop(self) -> None:
        """Stop serving; release every lease and abort every write session. Never raises."""
        loop = self._loop
        if loop is not None and self._thread is not None and self._thread.is_alive():
            async def shutdown():
                if self._reaper is not None:
                    self._reaper.cancel()
                if self._runner is not None:
                    await self._runner.cleanup()

            future = asyncio.run_coroutine_threadsafe(shutdown(), loop)
            try:
                future.result(_STOP_TIMEOUT)
            except Exception:  # noqa: B902 - stopping goes on
                LOG.exception('stopping the warehouse service')
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(_STOP_TIMEOUT)
        self.leases.close()
        self.app.close()

    def __enter__(self) -> 'WarehouseServer':
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
