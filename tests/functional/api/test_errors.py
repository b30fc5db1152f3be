"""Every error the API answers is of one form, {'error': {'code', 'title', 'message',
'request_id'}}, with the status it belongs to; every answer carries its request id, which
the log lines of the API and of the dispatcher for that request show."""
import http
import logging

from tests.functional.api import base
from tests.functional.api import helpers


class ErrorBodiesTest(base.ApiStackTest, helpers.ApiChecks):

    def test_each_status_in_the_error_form(self):
        cases = [
            (400, self.as_admin.get('/v1/clouds', params={'marker': 'nosuch'}), 'nosuch'),
            (401, self.anonymous.get('/v1/clouds'), ''),
            (401, self.client_with('bogus').get('/v1/clouds'), ''),
            (403, self.as_member.post('/v1/clouds', json={'name': 'm', 'connection_limit': 1}),
             ''),
            (404, self.as_admin.get('/v1/clouds/nosuch'), 'nosuch'),
            (404, self.as_admin.get('/v1/applications/nosuch'), 'nosuch'),
            (404, self.as_admin.get('/v1/deployments/nosuch'), 'nosuch'),
            (404, self.as_admin.get('/v1/snapshots/nosuch'), 'nosuch'),
            (404, self.as_admin.get('/v1/hosts/nosuch'), 'nosuch'),
            (404, self.as_admin.get('/v1/images/nosuch'), 'nosuch'),
            (404, self.as_admin.get('/v1/users/nosuch'), 'nosuch'),
            # FastAPI's own: no such route, no such method.
            (404, self.as_admin.get('/v1/nosuchcollection'), ''),
            (405, self.as_admin.put('/v1/clouds'), ''),
            (409, self.as_admin.delete('/v1/clouds/default'), 'default'),
            (409, self.as_admin.post('/v1/clouds', json={'name': 'default',
                                                         'connection_limit': 1}), 'default'),
            (422, self.as_admin.post('/v1/clouds', json={'name': 'x'}), 'connection_limit'),
            (422, self.as_admin.get('/v1/clouds', params={'limit': 0}), 'limit'),
            (422, self.as_admin.get('/v1/clouds', params={'limit': 'many'}), 'limit'),
            (422, self.as_admin.post('/v1/clouds', content=b'{"name": ',
                                     headers={'Content-Type': 'application/json'}), ''),
        ]
        for status, response, fragment in cases:
            error = self.assert_error(status, response, fragment)
            self.assertEqual(http.HTTPStatus(status).phrase, error['title'], error)
        self.assertEqual('Token', cases[1][1].headers['WWW-Authenticate'])

    def test_validation_messages_name_the_field_path(self):
        error = self.assert_error(422, self.as_admin.post('/v1/applications', json={
            'name': 'web', 'image': self.IMAGE, 'port': 80, 'protocol': 'http',
            'health': {'kind': 'tcp', 'port': 'eighty'}}))
        self.assertIn('health', error['message'])
        self.assertIn('port', error['message'])

    def test_every_answer_has_its_own_request_id(self):
        responses = [self.as_admin.get('/v1/clouds'), self.as_admin.get('/v1/clouds'),
                     self.anonymous.get('/healthz'), self.anonymous.get('/v1/clouds'),
                     self.as_admin.get('/v1/nosuch')]
        ids = [r.headers.get('X-OpenStack-Request-ID') for r in responses]
        for request_id in ids:
            self.assertIsNotNone(request_id)
            self.assertRegex(request_id, r'^req-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-'
                                         r'[0-9a-f]{4}-[0-9a-f]{12}$')
        self.assertEqual(len(ids), len(set(ids)))

    def test_the_request_id_is_in_the_logs_of_the_api_and_the_dispatcher(self):
        log = helpers.RequestLog()
        root = logging.getLogger()
        root.addHandler(log)
        self.addCleanup(root.removeHandler, log)
        for name in ('vmcloud', 'uvicorn'):
            logger = logging.getLogger(name)
            self.addCleanup(logger.setLevel, logger.level)
            logger.setLevel(logging.DEBUG)

        created = self.as_admin.post('/v1/clouds', json={'name': 'logged',
                                                         'connection_limit': 4})
        self.assert_status(201, created)
        self.addCleanup(self.as_admin.delete, '/v1/clouds/logged')
        request_id = created.headers['X-OpenStack-Request-ID']
        self.assertTrue(log.wait_lines_of(request_id, 'vmcloud.api'), log.records[-50:])
        dispatcher = log.wait_lines_of(request_id, 'vmcloud.dispatcher')
        self.assertTrue([line for line in dispatcher if 'logged' in line], log.records[-50:])

        refused = self.as_admin.get('/v1/clouds/nosuch')
        self.assert_error(404, refused)
        self.assertTrue(log.wait_lines_of(refused.headers['X-OpenStack-Request-ID'],
                                          'vmcloud.api'), log.records[-50:])
