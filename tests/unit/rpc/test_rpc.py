"""The RPC layer over fake://: errors come back whole, request ids travel, policy holds."""
import asyncio
import concurrent.futures
import contextvars
import json
import logging
import sys

from oslo_config import cfg
from oslo_log import formatters
from oslo_messaging._drivers import common
from oslo_messaging.rpc import dispatcher as rpc_dispatcher

from vmcloud import exception
from vmcloud import rpc
from vmcloud.cmd import service
from tests import base

TOPIC = 'vmcloud-test-rpc'


class Endpoint:
    def __init__(self):
        self.request_ids: list[str | None] = []
        self.ran_hidden = False

    @rpc.expose
    def echo(self, ctxt: dict, value):
        self.request_ids.append(rpc.current_request_id())
        logging.getLogger('vmcloud.test.server').info('echo %s', value)
        return value

    @rpc.expose
    def no_valid_host(self, ctxt: dict):
        raise exception.NoValidHost(8, 6, 5, 2, 'ram', 2)

    @rpc.expose
    def invalid(self, ctxt: dict):
        raise exception.InvalidRequest('min count 3 must be between 1 and 2')

    @rpc.expose
    def in_use(self, ctxt: dict):
        raise exception.ImageInUse('image guest', ['guest:2', 'guest:3'])

    @rpc.expose
    def bug(self, ctxt: dict):
        raise KeyError('oops')

    def hidden(self, ctxt: dict):
        self.ran_hidden = True


class ServerTestCase(base.TestCase):
    """An ``Endpoint`` served on fake://, and a client of it."""

    def setUp(self):
        super().setUp()
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('rpc_call_timeout', 30)
        self.addCleanup(rpc.cleanup)
        self.endpoint = Endpoint()
        server = rpc.server(self.conf, TOPIC, 'server1', [self.endpoint])
        server.start()
        self.addCleanup(server.wait)
        self.addCleanup(server.stop)
        self.client = rpc.Client(self.conf, TOPIC, 'test service')


class RpcTest(ServerTestCase):
    def test_an_error_arrives_as_its_class_with_its_fields(self):
        error = self.assertRaises(exception.NoValidHost, self.client.call, 'no_valid_host')
        self.assertIs(exception.NoValidHost, type(error))
        self.assertEqual((8, 6, 5, 2, 'ram', 2),
                         (error.requested, error.required, error.placed, error.hosts,
                          error.filter_name, error.eliminated))
        self.assertEqual(str(exception.NoValidHost(8, 6, 5, 2, 'ram', 2)), str(error))

    def test_an_error_with_only_a_message_keeps_it(self):
        error = self.assertRaises(exception.InvalidRequest, self.client.call, 'invalid')
        self.assertEqual('min count 3 must be between 1 and 2', str(error))

    def test_an_error_that_keeps_some_fields_keeps_its_message_and_those(self):
        error = self.assertRaises(exception.ImageInUse, self.client.call, 'in_use')
        self.assertIn('image guest has dependent snapshots: guest:2, guest:3', str(error))
        self.assertEqual(['guest:2', 'guest:3'], error.dependents)

    def test_a_remote_bug_is_a_vmcloud_error_naming_it(self):
        error = self.assertRaises(exception.VmcloudError, self.client.call, 'bug')
        self.assertIs(exception.VmcloudError, type(error))
        self.assertIn('KeyError', str(error))

    def test_only_exposed_methods_run(self):
        error = self.assertRaises(exception.MessagingError, self.client.call, 'hidden')
        self.assertIn('does not offer hidden', str(error))
        self.assertFalse(self.endpoint.ran_hidden)
        self.assertRaises(exception.MessagingError, self.client.call, '__init__')

    def test_the_request_id_travels_with_the_call(self):
        with rpc.request_context('req-from-the-client') as request_id:
            self.assertEqual('req-from-the-client', request_id)
            self.assertEqual(3, self.client.call('echo', value=3))
            self.assertEqual('req-from-the-client', rpc.current_request_id())
        self.assertIsNone(rpc.current_request_id())
        self.assertEqual(4, self.client.call('echo', value=4))  # none set: a new one
        first, second = self.endpoint.request_ids
        self.assertEqual('req-from-the-client', first)
        self.assertTrue(second.startswith('req-'))
        self.assertNotEqual(first, second)

    def test_the_service_log_format_shows_the_request_id(self):
        conf = cfg.ConfigOpts()
        service.setup_logging(conf)
        conf([])
        lines = []

        class Formatted(logging.Handler):
            def emit(self, record):
                lines.append(self.format(record))
        handler = Formatted()
        handler.setFormatter(formatters.ContextFormatter(project='vmcloud', config=conf))
        logger = logging.getLogger('vmcloud.test.server')
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self.addCleanup(logger.removeHandler, handler)
        with rpc.request_context('req-shown-in-the-log'):
            self.client.call('echo', value='x')
        self.assertEqual(1, len(lines), lines)
        self.assertIn('[req-shown-in-the-log] echo x', lines[0])

    def test_another_thread_keeps_the_request_id_when_asked(self):
        with rpc.request_context('req-in-a-pool'):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                carried = pool.submit(rpc.with_current_request(rpc.current_request_id))
                plain = pool.submit(rpc.current_request_id)
        self.assertEqual('req-in-a-pool', carried.result())
        self.assertIsNone(plain.result())


class TaskLocalRequestIdsTest(base.TestCase):
    """The request id is current per asyncio task, and in a thread that runs in a copy
    of its task's context, as FastAPI runs sync dependencies and endpoints: the API
    serves many requests in one event loop thread."""

    def test_concurrent_tasks_and_their_pool_threads_each_see_their_own(self):
        async def request(name: str, both_in: asyncio.Barrier,
                          pool: concurrent.futures.Executor) -> tuple:
            with rpc.request_context(f'req-{name}'):
                await both_in.wait()  # both ids made current in the one loop thread
                in_loop = rpc.current_request_id()
                # What anyio's run_sync does: the call in a copy of the task's context.
                in_pool = await asyncio.get_running_loop().run_in_executor(
                    pool, contextvars.copy_context().run, rpc.current_request_id)
            return in_loop, in_pool, rpc.current_request_id()

        async def serve() -> list:
            both_in = asyncio.Barrier(2)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                return await asyncio.gather(request('a', both_in, pool),
                                            request('b', both_in, pool))
        self.assertEqual([('req-a', 'req-a', None), ('req-b', 'req-b', None)],
                         asyncio.run(serve()))
        self.assertIsNone(rpc.current_request_id())


class OverRabbitTest(ServerTestCase):
    """What a client on RabbitMQ gets: the server's failure as oslo.messaging serializes
    it, deserialized for a caller that allows none of vmcloud's modules."""

    def fail_as_over_rabbit(self, method: str, exc_class=exception.VmcloudError):
        try:
            getattr(rpc._Endpoint(self.endpoint), method)({})
        except rpc_dispatcher.ExpectedException as expected:  # unwrapped by the server
            data = common.serialize_remote_exception(expected.exc_info)
        except Exception:
            data = common.serialize_remote_exception(sys.exc_info())
        remote = common.deserialize_remote_exception(data, [])

        def call():
            with self.client._errors(method, None):
                raise remote
        return self.assertRaises(exc_class, call)

    def test_an_error_arrives_with_its_fields(self):
        error = self.fail_as_over_rabbit('no_valid_host', exception.NoValidHost)
        self.assertIs(exception.NoValidHost, type(error))
        self.assertEqual((8, 6, 5, 2, 'ram', 2),
                         (error.requested, error.required, error.placed, error.hosts,
                          error.filter_name, error.eliminated))
        error = self.fail_as_over_rabbit('in_use', exception.ImageInUse)
        self.assertEqual(['guest:2', 'guest:3'], error.dependents)

    def test_a_remote_bug_is_one_line_naming_it(self):
        error = self.fail_as_over_rabbit('bug')
        self.assertIs(exception.VmcloudError, type(error))
        self.assertEqual("KeyError: 'oops'", str(error))

    def test_a_method_not_offered(self):
        try:
            raise rpc_dispatcher.NoSuchMethod('hidden')
        except rpc_dispatcher.NoSuchMethod:
            remote = common.deserialize_remote_exception(
                common.serialize_remote_exception(sys.exc_info()), [])

        def call():
            with self.client._errors('hidden', None):
                raise remote
        error = self.assertRaises(exception.MessagingError, call)
        self.assertIn('does not offer hidden', str(error))


class LocalErrorTest(base.TestCase):
    """What a RabbitMQ client gets: the remote exception's class name and message."""

    def test_a_carried_error_is_rebuilt(self):
        error = rpc.local_error('CarriedError', json.dumps({
            'class': 'DeploymentNotFound', 'message': 'deployment d1 not found',
            'fields': {'deployment_id': 'd1'}}))
        self.assertIs(exception.DeploymentNotFound, type(error))
        self.assertEqual('d1', error.deployment_id)

    def test_what_cannot_be_rebuilt_is_a_vmcloud_error(self):
        for exc_type, value in (('CarriedError', 'not json'),
                                ('CarriedError', json.dumps({'class': 'os.system',
                                                             'message': 'm'})),
                                ('RuntimeError', 'a bug')):
            error = rpc.local_error(exc_type, value)
            self.assertIs(exception.VmcloudError, type(error))


class RebuiltErrorTest(base.TestCase):
    """rpc.rebuilt_error: a class name, a message and fields as the same VmcloudError."""

    def test_the_class_with_its_fields_and_message(self):
        original = exception.NoValidHost(3, 2, 1, 4, 'RamFilter', 3)
        error = rpc.rebuilt_error('NoValidHost', str(original), rpc.error_fields(original))
        self.assertIs(exception.NoValidHost, type(error))
        self.assertEqual(str(original), str(error))
        self.assertEqual(rpc.error_fields(original), rpc.error_fields(error))

    def test_the_message_given_stays_with_the_fields(self):
        # Fields that would make another message (or none the class takes): the message
        # as it was said, the fields as attributes.
        error = rpc.rebuilt_error('CloudNotFound', 'cloud c1 is gone', {'name': 'c1'})
        self.assertEqual((exception.CloudNotFound, 'cloud c1 is gone', 'c1'),
                         (type(error), str(error), error.name))
        error = rpc.rebuilt_error('InvalidRequest', 'count below 1', {})
        self.assertEqual((exception.InvalidRequest, 'count below 1'),
                         (type(error), str(error)))

    def test_only_vmcloud_errors_of_vmcloud_exception(self):
        for name in ('KeyError', 'os', 'Exception', '', '__builtins__'):
            error = rpc.rebuilt_error(name, 'm', {})
            self.assertIs(exception.VmcloudError, type(error), name)
            self.assertIsNone(rpc.error_class(name), name)
        self.assertIs(exception.LoginThrottled, rpc.error_class('LoginThrottled'))
