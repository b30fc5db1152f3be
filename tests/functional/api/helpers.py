"""Checks and waits the API's functional tests share (the stack itself: base.py)."""
import logging
import time

import httpx

from vmcloud import polling
from vmcloud import rpc

TIMEOUT = 60
# A raw image of varied bytes (no chunk a hole), small enough to upload in a blink.
RAW_IMAGE = bytes(range(256)) * 4096


class ApiChecks:
    """Assertions on API answers, for a testtools.TestCase."""

    def client_with(self, token: str | None, headers: dict | None = None) -> httpx.Client:
        """A client of the same API with ``token`` (None: none) and ``headers``, closed
        when the test ends."""
        headers = dict(headers or {})
        if token is not None:
            headers['X-Auth-Token'] = token
        client = httpx.Client(base_url=self.as_admin.base_url, headers=headers,
                              timeout=TIMEOUT)
        self.addCleanup(client.close)
        return client

    def user_name(self, client: httpx.Client) -> str:
        """The name of the user whose token ``client`` holds."""
        return self.assert_status(200, client.get('/v1/auth/tokens'))['token']['user']['name']

    def assert_status(self, status: int, response: httpx.Response) -> dict | None:
        """:returns: the JSON body, if any."""
        self.assertEqual(status, response.status_code,
                         f'{response.request.method} {response.request.url}: '
                         f'{response.text[:2000]}')
        if not response.headers.get('Content-Type', '').startswith('application/json'):
            return None
        return response.json()

    def assert_error(self, status: int, response: httpx.Response,
                     *fragments: str) -> dict:
        """``response`` is an error of ``status`` in the API's form: {'error': {'code',
        'title', 'message', 'request_id'}}, the request id that of the response header,
        the message non-empty and holding every fragment (case-insensitive).

        :returns: the error object.
        """
        body = self.assert_status(status, response)
        self.assertIsInstance(body, dict, response.text)
        self.assertEqual({'error'}, set(body), body)
        error = body['error']
        self.assertEqual(status, error['code'], error)
        self.assertIsInstance(error.get('title'), str, error)
        self.assertTrue(error['title'], error)
        self.assertIsInstance(error.get('message'), str, error)
        self.assertTrue(error['message'].strip(), error)
        request_id = response.headers.get('X-OpenStack-Request-ID')
        self.assertIsNotNone(request_id, dict(response.headers))
        self.assertTrue(request_id.startswith('req-'), request_id)
        self.assertEqual(request_id, error['request_id'])
        for fragment in fragments:
            self.assertIn(fragment.lower(), error['message'].lower(), error)
        return error


def wait_for(client: httpx.Client, path: str, key: str, done, what: str,
             timeout: float = TIMEOUT) -> dict:
    """GET ``path`` until ``done(body[key])``; :returns: body[key].
    :raises: WaitTimedOut naming ``what``."""
    def poll() -> dict:
        response = client.get(path)
        response.raise_for_status()
        return response.json()[key]
    return polling.wait(poll, done, timeout, what, interval=0.05)


def wait_deployment(client: httpx.Client, deployment_id: str, state: str = 'active') -> dict:
    return wait_for(client, f'/v1/deployments/{deployment_id}', 'deployment',
                    lambda d: d['state'] == state, f'deployment {deployment_id} {state}')


def wait_deleted(client: httpx.Client, deployment_id: str) -> dict:
    """The deployment once it and every instance of it are deleted (what they held is
    free for the next test's deployments)."""
    return wait_for(client, f'/v1/deployments/{deployment_id}', 'deployment',
                    lambda d: d['state'] == 'deleted'
                    and all(i['state'] == 'deleted' for i in d['instances']),
                    f'deployment {deployment_id} deleted')


def delete_deployment(client: httpx.Client, deployment_id: str) -> None:
    """For cleanups: delete it unless it is gone, and wait until it is."""
    response = client.get(f'/v1/deployments/{deployment_id}')
    if response.status_code == 404:
        return
    if response.json()['deployment']['state'] != 'deleted':
        client.delete(f'/v1/deployments/{deployment_id}').raise_for_status()
    wait_deleted(client, deployment_id)


def walk(client: httpx.Client, path: str, collection: str) -> tuple[list[dict], list[str]]:
    """Every page of a list from ``path`` on, following the next links.

    :returns: the items in the order served, and every page's href asked for.
    """
    items, hrefs, href = [], [], path
    while href is not None:
        hrefs.append(href)
        response = client.get(href)
        response.raise_for_status()
        body = response.json()
        items.extend(body[collection])
        links = [link['href'] for link in body[f'{collection}_links'] if link['rel'] == 'next']
        assert len(links) <= 1, body[f'{collection}_links']
        href = links[0] if links else None
        if len(hrefs) > 10000:
            raise AssertionError(f'{path}: the next links do not end')
    return items, hrefs


class RequestLog(logging.Handler):
    """Every record of every logger, with the request id current in the thread that wrote
    it (what oslo.log's formatter shows on the line): (logger name, request id, message)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, str | None, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, rpc.current_request_id(), record.getMessage()))

    def lines_of(self, request_id: str, logger_prefix: str) -> list[str]:
        """The messages of loggers under ``logger_prefix`` whose line shows ``request_id``
        (current where they were written, or in the message)."""
        return [message for name, current, message in list(self.records)
                if (name == logger_prefix or name.startswith(logger_prefix + '.'))
                and (current == request_id or request_id in message)]

    def wait_lines_of(self, request_id: str, logger_prefix: str,
                      timeout: float = 5) -> list[str]:
        """As lines_of, for lines a thread may write just after the answer went."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines_of(request_id, logger_prefix)
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)
