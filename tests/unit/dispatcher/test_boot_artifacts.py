"""Kernels and initrds named as warehouse images: pinned by the dispatcher at deploy."""
from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.dispatcher import states
from tests.unit.compute import test_artifacts
from tests.unit.dispatcher import helpers

BOOT = {'kernel': 'vmlinuz', 'initrd': 'initrd', 'cmdline': 'vmcloud.id={name}'}


class BootArtifactsTest(helpers.CloudTestCase):
    def setUp(self):
        super().setUp()
        warehouse = self.cloud.warehouse
        self.kernel = test_artifacts.write_artifact(self.tmp, 'vmlinuz', seed=1)
        warehouse.import_image(self.kernel, 'vmlinuz', fmt='raw')
        warehouse.import_image(test_artifacts.write_artifact(self.tmp, 'initrd', seed=2),
                               'initrd', fmt='raw')

    def new_kernel_version(self) -> None:
        """vmlinuz:2, other bytes in its first chunk."""
        manifest = self.cloud.warehouse.lookup('vmlinuz')
        self.cloud.warehouse.snapshot_chunks(
            manifest.ref, {0: b'\x02' * manifest.chunk_length(0)})

    def spec_of(self, instance: dict):
        return self.cloud.node(instance['host']).driver.instances[instance['name']].spec

    def test_a_rebuild_boots_the_version_pinned_at_deploy(self):
        drivers = [c.driver for c in self.cloud.computes]
        failed = []
        for driver in drivers:
            def failing(spec, spawn=driver.spawn):
                if not failed:
                    failed.append(spec.name)
                    # A newer kernel arrives between the first build and its retry.
                    self.new_kernel_version()
                    raise exception.SpawnFailed(f'{spec.name}: refused on purpose')
                return spawn(spec)
            driver.spawn = failing
        deployment = self.deploy_and_wait(count=1, boot=BOOT)
        self.assertEqual('active', deployment['state'], deployment)
        self.assertEqual({'kernel': 'vmlinuz:1', 'initrd': 'initrd:1',
                          'cmdline': 'vmcloud.id={name}'}, deployment['boot'])
        instance, = deployment['instances']
        self.assertEqual(2, instance['attempts'])
        self.assertEqual(2, len(self.cloud.warehouse.versions('vmlinuz')))
        self.assertBytesEqual(test_artifacts.read(self.kernel),
                              test_artifacts.read(self.spec_of(instance).kernel))

    def test_an_unknown_artifact_is_refused_before_anything_is_claimed(self):
        for boot, error in (({'kernel': 'nosuch'}, exception.ImageNotFound),
                            ({'kernel': 'vmlinuz', 'initrd': 'initrd:9'},
                             exception.ImageNotFound),
                            ({'kernel': 'boot/vmlinuz'}, exception.InvalidRequest)):
            self.assertRaises(error, self.api.deploy, 'guest', 2, boot=boot)
        self.assertEqual([], self.api.list_deployments())
        with self.cloud.dispatcher.db.session() as session:
            self.assertEqual([], db_api.usage_by_host(session, states.RUNNING_STATES))

    def test_a_snapshot_redeploys_with_the_pinned_artifacts(self):
        deployment = self.deploy_and_wait(count=1, boot=BOOT)
        snapshot = self.api.wait_snapshot(self.api.snapshot(deployment['id'])['id'],
                                          helpers.TIMEOUT)
        self.assertEqual('available', snapshot['state'], snapshot)
        self.new_kernel_version()
        again = self.api.wait_deployment(self.api.deploy_snapshot(snapshot['id'])['id'],
                                         helpers.TIMEOUT)
        self.assertEqual('active', again['state'], again)
        self.assertEqual(deployment['boot'], again['boot'])
        self.assertBytesEqual(test_artifacts.read(self.kernel),
                              test_artifacts.read(self.spec_of(again['instances'][0]).kernel))
        # A boot given with the redeploy is pinned afresh.
        newer = self.api.deploy_snapshot(snapshot['id'], boot={'kernel': 'vmlinuz'})
        self.assertEqual({'kernel': 'vmlinuz:2'}, newer['boot'])
        # A pinned version deleted since is refused before anything is claimed.
        self.api.wait_deployment(newer['id'], helpers.TIMEOUT)
        self.cloud.warehouse.delete('initrd')
        before = len(self.api.list_deployments())
        self.assertRaises(exception.ImageNotFound, self.api.deploy_snapshot, snapshot['id'])
        self.assertEqual(before, len(self.api.list_deployments()))
