"""The dashboard in a browser (issue 17): headless Chromium (Debian's chromium and
chromedriver, driven by Selenium; nothing downloaded) on the emulated hosts of
test_gateway: log in, create a cloud with a connection limit, add an application,
deploy it with 2 instances, see it running, open connections through the gateway
from a client host and see the monitoring page's users and available connections
change within 1 s, close them and see it go back, then delete the deployment. Every
step through the dashboard's pages only; a screenshot of every page visited is kept
(ARTIFACTS) and attached to the test's details.

What runs where: the cloud of test_gateway.GatewayTestCase (controller, node1 and node2
in cgroups of their own, the gateway host gw, client1..client3) plus ``vmcloud api``
on the controller (Cluster.start_api) and its admin (Cluster.create_api_user).
Chromium runs in the machine's own namespace, which has no route to the hosts: it
browses a local port that netns.Host.forward carries to the API from client3 (the
admin's machine). The connections through the gateway are the test's own sockets made
in client1 (netns.Host.connect), each to the application's ``vmcloud.tcp_hold``
service, which answers at once and holds the connection open.

The issue states the 1 s as wall-clock time: from the moment the last connection is
open (or closed) to the moment the page shows it, read from the page's DOM every
POLL s. Every wait is bounded. Needs root, RabbitMQ, PostgreSQL, dnsmasq, HAProxy,
cgroup v2, the test guest and the packages chromium and chromium-driver.
"""
import contextlib
import os
import re
import secrets
import signal
import time
import urllib.parse

import fixtures
import testtools.content
import testtools.content_type
from selenium import webdriver
from selenium.common import exceptions as selenium_exceptions
from selenium.webdriver.chrome import service as chrome_service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support import ui

from tests.multihost import netns
from tests.multihost import test_cluster
from tests.multihost import test_gateway

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
BROWSER_ARGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=1280,1000',
                # Offline, quiet: no first-run page, no update or background fetches.
                '--no-first-run', '--disable-background-networking',
                '--disable-component-update', '--disable-dev-shm-usage')
REPO = netns.REPO
ARTIFACTS = os.path.join(os.environ.get('VMCLOUD_TEST_ARTIFACTS')
                         or os.path.join(REPO, '.test-artifacts'), 'dashboard')
ADMIN = 'admin'
CLOUD = 'web'
LIMIT = 20
HELD = 5
APPLICATION = 'hold'
COUNT = 2
# A page load or a form's answer (the API asks the dispatcher over RPC).
PAGE_TIMEOUT = 30.0
# What the issue asks of the monitoring page, and how often the test reads it.
LIVE_SECONDS = 1.0
POLL = 0.05
# How long the test keeps reading after LIVE_SECONDS, so that a slow page is measured
# (and reported) rather than only failed.
LIVE_WAIT = 10.0
# The deployment page, reloaded this often until its 2 instances run.
RELOAD = 2.0
DELETE_TIMEOUT = 180.0
# The gateway's listener answering once the deployment is active (test_gateway waits
# as long).
ANSWER_TIMEOUT = 120.0
# chromedriver and Chromium get this long to be gone once the session ends.
QUIT_TIMEOUT = 10.0
_DEPLOYMENT_URL = re.compile(r'/dashboard/deployments/([^/?#]+)$')

# Reads the monitoring page in one round trip: cloud NAME's row of #clouds (each
# data-field cell's text), the #connections rows, #updated and #gateway-status.
READ_MONITORING = """
const row = document.querySelector('#clouds tr[data-cloud="' + CSS.escape(arguments[0]) + '"]');
const fields = el => Object.fromEntries([...el.querySelectorAll('[data-field]')].map(
    cell => [cell.dataset.field, cell.textContent.trim()]));
const text = id => {
    const el = document.getElementById(id);
    return el ? el.textContent.trim() : null;
};
return {
    cloud: row ? fields(row) : null,
    connections: [...document.querySelectorAll('#connections tr')]
        .filter(r => r.querySelector('[data-field]')).map(fields),
    updated: text('updated'),
    gateway: text('gateway-status'),
};
"""


def number(text: str | None) -> int | str | None:
    """A figure of the page as a number if it is one (the page shows text)."""
    if text is not None and re.fullmatch(r'\d+', text.strip()):
        return int(text)
    return text


def refuse_selenium_manager(*args, **kwargs):
    raise AssertionError('Selenium Manager must not run: it downloads browsers and drivers '
                         f'(give the Service the driver\'s path); asked {args[1:]}')


class DashboardTest(test_gateway.GatewayTestCase):
    """The issue's flow on the dashboard, one step after the other (each needs the one
    before: a cloud for the application's deployment, a deployment for connections)."""

    APP = APPLICATION
    PROTOCOL = 'tcp'
    PORT = test_gateway.HOLD_PORT
    COUNT = COUNT
    CLOUD = CLOUD

    @classmethod
    def prepare(cls) -> None:
        """Not test_gateway's deployment through the CLI (the dashboard makes the cloud,
        the application and the deployment): the API and its admin."""
        cls.admin_password = secrets.token_urlsafe(18)
        cls.cloud.start_api()
        cls.cloud.create_api_user(ADMIN, cls.admin_password, role='admin')

    def setUp(self):
        super().setUp()
        self.pages = 0
        os.makedirs(ARTIFACTS, exist_ok=True)
        for leaf in os.listdir(ARTIFACTS):  # one run's screenshots, not a mix of runs
            if leaf.endswith('.png'):
                os.unlink(os.path.join(ARTIFACTS, leaf))
        self.useFixture(fixtures.MonkeyPatch(
            'selenium.webdriver.common.selenium_manager.SeleniumManager.binary_paths',
            refuse_selenium_manager))
        stack = contextlib.ExitStack()
        self.addCleanup(stack.close)
        admin_host = self.clients[2]
        api = self.cloud.api_host
        local_port = stack.enter_context(admin_host.forward(api.address, self.cloud.api_port))
        self.base_url = f'http://127.0.0.1:{local_port}'
        # Added after the forwarder's: the browser quits before the forwarder closes.
        self.driver = self.start_browser()
        self.addOnException(self.screenshot_failure)

    # -- the browser ----------------------------------------------------------------

    def start_browser(self) -> webdriver.Chrome:
        """Chromium under chromedriver, both Debian's, a profile in the test's own
        directory; quit (and anything of it left killed) when the test ends."""
        profile = os.path.join(self.tmp, 'chromium-profile')
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in BROWSER_ARGS + (f'--user-data-dir={profile}',):
            options.add_argument(arg)
        log = os.path.join(self.tmp, 'chromedriver.log')
        self.addOnException(lambda _exc_info: self.attach_file('chromedriver.log', log))
        service = chrome_service.Service(executable_path=CHROMEDRIVER, log_output=log)
        started = time.monotonic()
        driver = webdriver.Chrome(service=service, options=options)
        self.measured['browser_start_seconds'] = round(time.monotonic() - started, 2)
        self.addCleanup(self.quit_browser, driver, profile)
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        return driver

    def quit_browser(self, driver: webdriver.Chrome, profile: str) -> None:
        """End the session, then kill (by pid) whatever of this test's browser is left:
        its chromedriver, and every process naming its profile directory."""
        try:
            driver.quit()
        except Exception as exc:  # the session may be dead already: kill below
            self.measured['browser_quit_error'] = repr(exc)
        process = driver.service.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(QUIT_TIMEOUT)
        deadline = time.monotonic() + QUIT_TIMEOUT
        while left := test_cluster.processes_naming(profile):
            if time.monotonic() >= deadline:
                self.measured['browser_processes_killed'] = left
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)

    def attach_file(self, name: str, path: str) -> None:
        if os.path.exists(path):
            self.addDetail(name, testtools.content.content_from_file(path, buffer_now=True))

    def screenshot(self, name: str) -> str:
        """The page as it is now, saved as ARTIFACTS/NN-name.png and attached.

        :returns: the file's path.
        """
        self.pages += 1
        path = os.path.join(ARTIFACTS, f'{self.pages:02d}-{name}.png')
        self.driver.save_screenshot(path)
        with open(path, 'rb') as f:
            data = f.read()
        self.addDetail(f'screenshot-{self.pages:02d}-{name}', testtools.content.Content(
            testtools.content_type.ContentType('image', 'png'), lambda: [data]))
        return path

    def screenshot_failure(self, _exc_info) -> None:
        with contextlib.suppress(Exception):
            self.screenshot('failure')
            self.addDetail('failure-page', testtools.content.text_content(
                f'{self.driver.current_url}\n{self.driver.page_source}'))

    def wait_loaded(self, previous=None) -> None:
        """Wait (PAGE_TIMEOUT) until the page that replaces ``previous`` (an element of
        the old one) is loaded."""
        wait = ui.WebDriverWait(self.driver, PAGE_TIMEOUT)
        if previous is not None:
            wait.until(expected_conditions.staleness_of(previous))
        wait.until(lambda d: d.execute_script('return document.readyState') == 'complete')

    def visit(self, path: str, name: str) -> None:
        """Open the dashboard's ``path``, check it answered a page without an error
        message, and keep its screenshot."""
        self.driver.get(self.base_url + path)
        self.wait_loaded()
        self.screenshot(name)
        self.assert_no_error(f'GET {path}', login=path == '/dashboard/login')

    def assert_no_error(self, what: str, login: bool = False) -> None:
        """The page shows no error message, and is the login page only if ``login``
        (else the session was lost)."""
        errors = [e.text for e in self.driver.find_elements(By.CSS_SELECTOR, '.error')
                  if e.is_displayed() and e.text.strip()]
        self.assertEqual([], errors, f'{what}: the page ({self.driver.current_url}) says')
        on_login = urllib.parse.urlsplit(self.driver.current_url).path == '/dashboard/login'
        self.assertEqual(login, on_login, f'{what}: landed on {self.driver.current_url}')

    def fill(self, field_id: str, value: str) -> None:
        """Set form field ``field_id``, whether a text input or a select."""
        element = self.driver.find_element(By.ID, field_id)
        if element.tag_name == 'select':
            choice = ui.Select(element)
            try:
                choice.select_by_value(value)
            except selenium_exceptions.NoSuchElementException:
                choice.select_by_visible_text(value)
            return
        element.clear()
        if value:
            element.send_keys(value)

    def choose_hosts(self, hosts: list[str]) -> None:
        """The cloud form's hosts: a multiple select ``#hosts`` or checkboxes
        ``name="hosts"``."""
        element = self.driver.find_element(By.ID, 'hosts')
        if element.tag_name == 'select':
            choice = ui.Select(element)
            choice.deselect_all()
            for host in hosts:
                choice.select_by_value(host)
            return
        for box in self.driver.find_elements(By.CSS_SELECTOR, 'input[name="hosts"]'):
            if box.is_selected() != (box.get_attribute('value') in hosts):
                box.click()

    def submit(self, button_id: str, name: str) -> None:
        """Press ``button_id``, wait for the answer, keep its screenshot, and check it
        says no error."""
        previous = self.driver.find_element(By.TAG_NAME, 'html')
        self.driver.find_element(By.ID, button_id).click()
        self.wait_loaded(previous)
        self.screenshot(name)
        self.assert_no_error(f'#{button_id}')

    def row(self, key: str, value: str):
        """A list page's row ``<tr data-KEY="VALUE">`` or None."""
        rows = self.driver.find_elements(By.CSS_SELECTOR, f'tr[data-{key}="{value}"]')
        return rows[0] if rows else None

    # -- the monitoring page ----------------------------------------------------------

    def read_monitoring(self) -> dict:
        seen = self.driver.execute_script(READ_MONITORING, CLOUD)
        if seen['cloud'] is not None:
            seen['cloud'] = {k: number(v) for k, v in seen['cloud'].items()}
        return seen

    def until_shown(self, what: str, wanted) -> tuple[float, dict]:
        """Read the monitoring page every POLL s until ``wanted(reading)``, from now
        (wall clock) for at most LIVE_WAIT s.

        :returns: (seconds it took, the reading). :raises: AssertionError with the
            last reading if it never shows.
        """
        start = time.monotonic()
        while True:
            seen = self.read_monitoring()
            elapsed = time.monotonic() - start
            if wanted(seen):
                return elapsed, seen
            if elapsed >= LIVE_WAIT:
                self.screenshot('monitoring-timeout')
                self.fail(f'the monitoring page did not show {what} in {LIVE_WAIT:g} s; '
                          f'it shows {seen}')
            time.sleep(max(0.0, start + POLL * (int(elapsed / POLL) + 1) - time.monotonic()))

    @staticmethod
    def figures(users: int, connections: int, available: int):
        def shown(seen: dict) -> bool:
            cloud = seen['cloud'] or {}
            return (cloud.get('users'), cloud.get('connections'),
                    cloud.get('available')) == (users, connections, available)
        return shown

    # -- the flow ----------------------------------------------------------------------

    def test_cloud_application_deployment_monitoring_and_delete_in_a_browser(self):
        self.log_in()
        self.create_cloud()
        self.create_application()
        deployment_id = self.deploy()
        listener_port = self.wait_running(deployment_id)
        self.watch_connections(listener_port)
        self.delete(deployment_id)

    def log_in(self) -> None:
        self.visit('/dashboard/login', 'login')
        self.fill('username', ADMIN)
        self.fill('password', self.admin_password)
        self.submit('login', 'overview')

    def create_cloud(self) -> None:
        self.visit('/dashboard/clouds/new', 'cloud-new')
        self.fill('name', CLOUD)
        self.fill('connection_limit', str(LIMIT))
        self.choose_hosts(['node1', 'node2'])
        self.submit('save', 'cloud-created')
        self.visit('/dashboard/clouds', 'clouds')
        self.assertIsNotNone(self.row('name', CLOUD), 'no row of cloud web on the clouds page')

    def create_application(self) -> None:
        self.visit('/dashboard/applications/new', 'application-new')
        for field_id, value in (
                ('name', APPLICATION), ('image', 'guest'), ('port', str(self.PORT)),
                ('protocol', 'tcp'), ('vcpus', '1'),
                ('memory_mib', str(test_gateway.MEMORY_MIB)), ('kernel', 'guest-kernel'),
                ('initrd', 'guest-initrd'), ('cmdline', test_gateway.CMDLINE),
                ('health_kind', 'tcp'), ('health_port', str(self.PORT)),
                ('health_path', ''), ('connection_limit', '')):
            self.fill(field_id, value)
        self.submit('save', 'application-created')
        self.visit('/dashboard/applications', 'applications')
        self.assertIsNotNone(self.row('name', APPLICATION),
                             'no row of application hold on the applications page')

    def deploy(self) -> str:
        """Deploy the application from the deploy form. :returns: the deployment's id,
        from the page it lands on."""
        self.visit('/dashboard/deployments/new', 'deployment-new')
        self.fill('application', APPLICATION)
        self.fill('cloud', CLOUD)
        self.fill('count', str(COUNT))
        self.deploy_started = time.monotonic()
        self.submit('deploy', 'deployment-building')
        path = urllib.parse.urlsplit(self.driver.current_url).path
        match = _DEPLOYMENT_URL.search(path)
        self.assertIsNotNone(match, f'deploying landed on {path}, not a deployment\'s page')
        return urllib.parse.unquote(match.group(1))

    def deployment_page(self) -> dict:
        """The deployment's page as shown: its state, its instances' states, its
        listener port."""
        return self.driver.execute_script(READ_DEPLOYMENT)

    def wait_running(self, deployment_id: str) -> int:
        """Reload the deployment's page until it shows the deployment active with COUNT
        instances running (test_gateway.DEPLOY_TIMEOUT), then wait until its listener
        answers through the gateway. :returns: the listener port the page shows."""
        path = f'/dashboard/deployments/{urllib.parse.quote(deployment_id, safe="")}'
        deadline = time.monotonic() + test_gateway.DEPLOY_TIMEOUT
        while True:
            self.driver.get(self.base_url + path)
            self.wait_loaded()
            shown = self.deployment_page()
            if (shown['state'] == 'active'
                    and shown['instances'].count('active') == COUNT):
                break
            self.assertNotIn(shown['state'], ('error', 'deleted'), shown)
            if time.monotonic() >= deadline:
                self.screenshot('deployment-timeout')
                self.fail(f'deployment {deployment_id} not active with {COUNT} instances '
                          f'running after {test_gateway.DEPLOY_TIMEOUT} s: {shown}')
            time.sleep(RELOAD)
        self.measured['deploy_seconds'] = round(time.monotonic() - self.deploy_started, 1)
        self.screenshot('deployment-active')
        self.visit('/dashboard/deployments', 'deployments')
        state = self.row('id', deployment_id).find_element(By.CSS_SELECTOR,
                                                           '[data-field="state"]')
        self.assertEqual('active', state.text.strip())
        port = number(shown['listener_port'])
        self.assertIsInstance(port, int, f'no listener port on the deployment page: {shown}')
        self.cloud.wait_for('the listener to answer through the gateway',
                            lambda: self.answers(port), lambda seen: seen is True,
                            ANSWER_TIMEOUT)
        return port

    def answers(self, port: int) -> bool | str:
        """Whether a connection from client1 through the gateway to ``port`` is answered
        (closed again at once); else why not."""
        try:
            connection = test_gateway.open_hold(self.clients[0], self.gateway.address, port)
        except (OSError, test_gateway.Refused) as exc:
            return repr(exc)
        test_gateway.close(connection.sock)
        return True

    def watch_connections(self, listener_port: int) -> None:
        """HELD connections from client1 through the gateway: the monitoring page shows
        1 user, HELD connections, LIMIT - HELD available within LIVE_SECONDS of the last
        one opening, and each in its connections table; all closed, it shows 0, 0,
        LIMIT within LIVE_SECONDS of the last one closing."""
        self.visit('/dashboard/monitoring', 'monitoring')
        # The connection answers_once made is gone first.
        self.until_shown('no connection', self.figures(0, 0, LIMIT))
        client = self.clients[0]
        for _ in range(HELD):
            self.open(client, listener_port)
        opened = time.monotonic()
        seconds, seen = self.until_shown(f'1 user, {HELD} connections',
                                         self.figures(1, HELD, LIMIT - HELD))
        self.measured['seconds_to_show_opened'] = round(seconds, 3)
        _, seen = self.until_shown(f'{HELD} rows in #connections',
                                   lambda s: len(s['connections']) == HELD)
        self.measured['seconds_to_list_opened'] = round(time.monotonic() - opened, 3)
        self.screenshot('monitoring-connections')
        self.assertEqual([(client.address, APPLICATION)] * HELD,
                         [(c.get('client', '').split(':')[0], c.get('application'))
                          for c in seen['connections']], seen)
        self.assertLessEqual(seconds, LIVE_SECONDS, self.measured)
        # The overview's used-vs-limit bars with the connections held.
        self.visit('/dashboard/', 'overview-connections')

        self.visit('/dashboard/monitoring', 'monitoring-before-close')
        self.until_shown(f'{HELD} connections', self.figures(1, HELD, LIMIT - HELD))
        self.close_held()
        seconds, _ = self.until_shown('no connection', self.figures(0, 0, LIMIT))
        self.measured['seconds_to_show_closed'] = round(seconds, 3)
        self.screenshot('monitoring-closed')
        self.assertLessEqual(seconds, LIVE_SECONDS, self.measured)

    def delete(self, deployment_id: str) -> None:
        """Delete the deployment with its page's delete button, then reload the
        deployments page until it shows it deleted (or lists it no more)."""
        path = f'/dashboard/deployments/{urllib.parse.quote(deployment_id, safe="")}'
        self.visit(path, 'deployment-before-delete')
        previous = self.driver.find_element(By.TAG_NAME, 'html')
        self.driver.find_element(By.CSS_SELECTOR, '.delete').click()
        with contextlib.suppress(selenium_exceptions.NoAlertPresentException):
            self.driver.switch_to.alert.accept()  # a confirmation, if the page asks
        self.wait_loaded(previous)
        self.screenshot('deployment-deleting')
        self.assert_no_error('.delete')
        deadline = time.monotonic() + DELETE_TIMEOUT
        started = time.monotonic()
        while True:
            self.driver.get(self.base_url + '/dashboard/deployments')
            self.wait_loaded()
            row = self.row('id', deployment_id)
            state = (row.find_element(By.CSS_SELECTOR, '[data-field="state"]').text.strip()
                     if row is not None else None)
            if state in (None, 'deleted'):
                break
            if time.monotonic() >= deadline:
                self.fail(f'deployment {deployment_id} is {state} {DELETE_TIMEOUT:g} s '
                          'after its delete')
            time.sleep(RELOAD)
        self.measured['delete_seconds'] = round(time.monotonic() - started, 1)
        self.screenshot('deployment-deleted')


# The deployment's page: its state and listener port (#deployment's data-field cells),
# each instance's state (#instances' rows).
READ_DEPLOYMENT = """
const field = name => {
    const el = document.querySelector('#deployment [data-field="' + name + '"]');
    return el ? el.textContent.trim() : null;
};
return {
    state: field('state'),
    listener_port: field('listener_port'),
    instances: [...document.querySelectorAll('#instances tbody tr [data-field="state"]')]
        .map(el => el.textContent.trim()),
};
"""
