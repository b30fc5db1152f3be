"""The errors of issue 17 are rebuilt on the calling side as the same class with the same
fields and message (the REST API maps them to statuses by class): as vmcloud.rpc
carries them."""
import json

from vmcloud import exception
from vmcloud import rpc
from tests import base

IN_USE = 'is deployed: d1; delete those deployments first'
# Each error and the fields it keeps.
ERRORS = ((exception.MarkerNotFound('d1'), {'marker': 'd1'}),
          (exception.NameInUse('cloud', 'blue'), {'kind': 'cloud', 'name': 'blue'}),
          (exception.InUse('application', 'web', IN_USE),
           {'kind': 'application', 'name': 'web', 'reason': IN_USE}),
          (exception.SnapshotNotFound('s1'), {'snapshot_id': 's1'}),
          (exception.Unauthorized('the token expired'), {'message': 'the token expired'}),
          (exception.Forbidden('admins only'), {'message': 'admins only'}),
          (exception.LoginThrottled(30), {'retry_after': 30}),
          (exception.ApiError(502, 'bad gateway', 'req-1'),
           {'status': 502, 'message': 'bad gateway', 'request_id': 'req-1'}))


class CarriedErrorsTest(base.TestCase):
    def test_each_is_rebuilt_with_its_class_fields_and_message(self):
        for error, fields in ERRORS:
            self.assertEqual(fields, rpc.error_fields(error))
            carried = rpc.local_error('CarriedError', json.dumps({
                'class': type(error).__name__, 'message': str(error),
                'fields': rpc.error_fields(error)}))
            self.assertIs(type(error), type(carried))
            self.assertEqual((str(error), fields), (str(carried), rpc.error_fields(carried)))

    def test_the_dispatcher_s_are_invalid_requests_with_the_messages_of_before(self):
        dispatchers = [error for error, _ in ERRORS[:4]]
        self.assertEqual(['marker d1 not found', 'cloud blue exists already',
                          f'application web {IN_USE}', 'snapshot s1 not found'],
                         [str(e) for e in dispatchers])
        for error in dispatchers:
            self.assertIsInstance(error, exception.InvalidRequest)
        for error, _ in ERRORS[4:]:
            self.assertNotIsInstance(error, exception.InvalidRequest)
