"""``vmcloud demo``: the all-in-one cloud deploys, snapshots and redeploys real guests,
with the API and its dashboard serving it (the transport is fake://, in this process)."""
import argparse
import os
import secrets
import sys
import time

from oslo_config import cfg

from vmcloud import allinone
from vmcloud import exception
from vmcloud.api import app as api_app
from vmcloud.cmd import output
from vmcloud.dispatcher import states
from vmcloud.drivers import base as driver_base


class _Demo:
    def __init__(self, conf: cfg.ConfigOpts, args: argparse.Namespace):
        self.args = args
        self.cloud = allinone.AllInOne(conf, hosts=args.hosts, driver=args.driver)
        self.api = self.cloud.api
        self.rows: list[dict] = []

    def step(self, what: str, started: float, **facts) -> None:
        row = {'step': what, 'seconds': f'{time.monotonic() - started:.2f}'}
        row.update(facts)
        self.rows.append(row)
        print(f'{what}: {row["seconds"]} s', flush=True)

    def fetched_since(self, before: allinone.Fetched | None = None) -> dict[str, int]:
        """The step's bytes from the repository and from peers (the nodes', on loopback)
        apart: together they would count a chunk the repository served once as many
        times as nodes read it."""
        now = self.cloud.fetched()
        return {'repository_bytes': now.repository_bytes - (before.repository_bytes
                                                            if before else 0),
                'peer_bytes': now.peer_bytes - (before.peer_bytes if before else 0)}

    def settle(self, deployment: dict) -> dict:
        deployment = self.api.wait_deployment(deployment['id'], self.args.timeout)
        if deployment['state'] != states.ACTIVE:
            raise exception.VmcloudError(f'deployment ended {deployment["state"]}: '
                                         f'{deployment["reason"]}')
        for instance in deployment['instances']:
            driver = self.cloud.node(instance['host']).driver
            driver.wait_for_event(instance['name'], driver_base.APP_RUNNING, self.args.timeout)
        return deployment

    def run(self) -> None:
        warehouse = self.cloud.warehouse
        if 'guest' not in warehouse.images():
            warehouse.import_image(os.path.join(self.args.guest, 'disk.img'), 'guest')
        image = warehouse.lookup('guest')
        boot = {'kernel': os.path.join(self.args.guest, 'vmlinuz'),
                'initrd': os.path.join(self.args.guest, 'initrd.img'),
                'cmdline': 'console=ttyS0 quiet no_timer_check vmcloud.id={name}'}
        count = self.args.count

        started = time.monotonic()
        first = self.settle(self.api.deploy('guest', count, boot=boot))
        self.step(f'deploy {count} on {self.args.hosts} nodes', started,
                  **self.fetched_since(), stored_bytes='', image_bytes=image.size)

        started = time.monotonic()
        stored_before = warehouse.stats().stored_bytes
        snapshot = self.api.snapshot(first['id'])
        pause = max(item['pause_ms'] or 0 for item in snapshot['items'])
        snapshot = self.api.wait_snapshot(snapshot['id'], self.args.timeout)
        if snapshot['state'] != states.AVAILABLE:
            raise exception.VmcloudError(f'snapshot ended {snapshot["state"]}: '
                                         f'{snapshot["reason"]}')
        dirty = sum(item['dirty_bytes'] for item in snapshot['items'])
        self.step(f'snapshot {count} (longest pause {pause:.0f} ms)', started,
                  repository_bytes='', peer_bytes='',
                  stored_bytes=warehouse.stats().stored_bytes - stored_before,
                  dirty_bytes=dirty)

        self.api.delete_deployment(first['id'])
        fetched_before = self.cloud.fetched()
        started = time.monotonic()
        second = self.settle(self.api.deploy_snapshot(snapshot['id']))
        self.step(f'deploy {count} from the snapshots', started,
                  **self.fetched_since(fetched_before), stored_bytes='')
        inherited = 0
        names = {i['id']: i['name'] for i in first['instances']}
        origin = {item['version']: names[item['instance_id']] for item in snapshot['items']}
        for instance in second['instances']:
            log = self.cloud.node(instance['host']).driver.console_log(instance['name'])
            inherited += f'VMCLOUD-PREVIOUS {origin[instance["image"]]}' in log
        print(f'{inherited} of {count} redeployed guests found the file their snapshot '
              'source wrote', flush=True)
        if inherited != count:
            raise exception.VmcloudError('a snapshot lost what its guest wrote')

    def report(self) -> None:
        output.emit(self.rows, ('step', 'seconds', 'repository_bytes', 'peer_bytes',
                                'stored_bytes', 'dirty_bytes', 'image_bytes'), 'table')


def _start_api(conf: cfg.ConfigOpts, port: int) -> api_app.ApiServer:
    """The API over the all-in-one cloud, and an admin login for its dashboard: a new
    password each run, printed (the demo's state directory is its own)."""
    try:
        server = api_app.ApiServer(conf, port=port).start()
    except exception.ConfigError as exc:
        if port == 0:
            raise
        # Another program holds the port: the demo is no reason to fail on that.
        print(f'{exc}; serving on a free port instead', flush=True)
        server = api_app.ApiServer(conf, port=0).start()
    password = secrets.token_urlsafe(12)
    identity = server.services.identity
    try:
        identity.create_user('admin', password, 'admin')
    except exception.NameInUse:
        identity.update_user('admin', password=password)
    print(f'dashboard: {server.url}/dashboard/  login: admin  password: {password}',
          flush=True)
    return server


def do_demo(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    demo = _Demo(conf, args)
    demo.cloud.start()
    try:
        api = _start_api(conf, args.api_port) if args.api_port >= 0 else None
        try:
            demo.run()
            demo.report()
            if api is not None and sys.stdin.isatty():
                input(f'the API serves on {api.url}/dashboard/: press Enter to stop ')
        finally:
            if api is not None:
                api.stop()
    finally:
        demo.cloud.stop()
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    sub = groups.add_parser('demo', help='all-in-one: deploy, snapshot and redeploy N guests')
    sub.set_defaults(handler=do_demo, log=False)
    sub.add_argument('--guest', required=True,
                     help='directory of the test guest (vmlinuz, initrd.img, disk.img)')
    sub.add_argument('-n', '--count', type=int, default=8)
    sub.add_argument('--hosts', type=int, default=2)
    sub.add_argument('--driver', default='qemu', choices=('qemu', 'libvirt'))
    sub.add_argument('--timeout', type=float, default=300)
    sub.add_argument('--api-port', type=int, default=8780,
                     help='port of the API and dashboard on [api] listen_address (0: any '
                          'free port, -1: no API); on a terminal it serves until Enter')
