"""Pages: limit and marker (checked), next links keeping the other query parameters and
ending on the last page, keyset pages of a list held whole; and the users list walked
page by page through the app."""
import urllib.parse

import fastapi

from tests import base
from tests.unit.api import test_app
from vmcloud import exception
from vmcloud.api import pagination

NAMES = [f'n{i:02d}' for i in range(10)]


class PaginationTest(test_app.ApiTestCase):

    def setUp(self):
        super().setUp()
        self.conf.set_override('page_size', 4, 'api')
        self.conf.set_override('max_page_size', 6, 'api')
        rows = [{'name': name, 'n': i} for i, name in enumerate(NAMES)]

        def things(request: fastapi.Request,
                   page: pagination.Page = fastapi.Depends(pagination.params),
                   kind: str | None = None):
            return pagination.listed(request, 'things',
                                     pagination.paged_list(rows, page, 'name'), page, 'name')
        self.probe('/v1/things', things)

    def walk(self, href: str) -> tuple[list[str], list[str]]:
        """Every page from ``href``: the names in order, and each href asked."""
        names, hrefs = [], []
        while href is not None:
            hrefs.append(href)
            body = self.admin.get(href).json()
            names += [row['name'] for row in body['things']]
            nexts = [link['href'] for link in body['things_links'] if link['rel'] == 'next']
            self.assertLessEqual(len(nexts), 1)
            href = nexts[0] if nexts else None
        return names, hrefs

    def test_pages_of_the_default_size_then_of_a_given_limit(self):
        names, hrefs = self.walk('/v1/things')
        self.assertEqual(NAMES, names)
        self.assertEqual(['/v1/things', '/v1/things?limit=4&marker=n03',
                          '/v1/things?limit=4&marker=n07'], hrefs)
        names, hrefs = self.walk('/v1/things?limit=5')
        self.assertEqual(NAMES, names)
        # 10 rows in pages of 5: the second page is the last, without a next link.
        self.assertEqual(2, len(hrefs))

    def test_next_links_keep_the_other_parameters(self):
        body = self.admin.get('/v1/things', params=[('kind', 'a b&c'), ('limit', 3)]).json()
        href = body['things_links'][0]['href']
        path, _, query = href.partition('?')
        self.assertEqual('/v1/things', path)
        self.assertEqual([('kind', 'a b&c'), ('limit', '3'), ('marker', 'n02')],
                         urllib.parse.parse_qsl(query))
        self.assertEqual(['n03', 'n04', 'n05'],
                         [r['name'] for r in self.admin.get(href).json()['things']])

    def test_limits_and_markers_are_checked(self):
        for limit in (0, -1, 7, 'many', ''):
            self.assert_error(422, self.admin.get('/v1/things', params={'limit': limit}),
                              'query.limit')
        self.assertEqual(6, len(self.admin.get('/v1/things', params={
            'limit': 6}).json()['things']))
        self.assert_error(400, self.admin.get('/v1/things', params={'marker': 'nosuch'}),
                          'nosuch')
        last = self.admin.get('/v1/things', params={'marker': NAMES[-1]}).json()
        self.assertEqual({'things': [], 'things_links': []}, last)

    def test_the_users_list_in_pages(self):
        for i in range(5):
            self.identity.create_user(f'user{i}', 'long-enough', 'member')
        body = self.admin.get('/v1/users', params={'limit': 3}).json()
        self.assertEqual([test_app.ADMIN, test_app.MEMBER, 'user0'],
                         [u['name'] for u in body['users']])
        self.assertEqual([{'rel': 'next', 'href': '/v1/users?limit=3&marker=user0'}],
                         body['users_links'])
        body = self.admin.get(body['users_links'][0]['href']).json()
        self.assertEqual(['user1', 'user2', 'user3'], [u['name'] for u in body['users']])
        body = self.admin.get(body['users_links'][0]['href']).json()
        self.assertEqual((['user4'], []), ([u['name'] for u in body['users']],
                                           body['users_links']))


class PagedListTest(base.TestCase):
    ROWS = [{'id': str(i)} for i in range(5)]

    def test_a_page_and_one_more_after_the_marker(self):
        self.assertEqual(self.ROWS[:3], pagination.paged_list(
            self.ROWS, pagination.Page(2, None), 'id'))
        self.assertEqual(self.ROWS[2:5], pagination.paged_list(
            self.ROWS, pagination.Page(2, '1'), 'id'))
        self.assertEqual([], pagination.paged_list(self.ROWS, pagination.Page(2, '4'), 'id'))
        error = self.assertRaises(exception.MarkerNotFound, pagination.paged_list,
                                  self.ROWS, pagination.Page(2, '9'), 'id')
        self.assertEqual('9', error.marker)

    def test_a_full_last_page_has_no_next_link(self):
        class Request:
            class url:
                path = '/v1/x'
            query_params = fastapi.datastructures.QueryParams('')
        exact = pagination.listed(Request, 'x', self.ROWS[:2], pagination.Page(2, None), 'id')
        self.assertEqual([], exact['x_links'])
        more = pagination.listed(Request, 'x', self.ROWS[:3], pagination.Page(2, None), 'id')
        self.assertEqual(self.ROWS[:2], more['x'])
        self.assertEqual([{'rel': 'next', 'href': '/v1/x?limit=2&marker=1'}], more['x_links'])

    def test_split_shows_the_limit_and_marks_the_next_page(self):
        page = pagination.Page(2, None)
        self.assertEqual((self.ROWS[:2], '1'), pagination.split(self.ROWS[:3], page, 'id'))
        self.assertEqual((self.ROWS[:2], None), pagination.split(self.ROWS[:2], page, 'id'))
        self.assertEqual(([], None), pagination.split([], page, 'id'))
