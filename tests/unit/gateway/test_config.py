"""HAProxy's static configuration: what it binds, which maps and backends it has, and
the rules of the limit check (HAProxy itself runs it in tests/functional/gateway)."""
from vmcloud import exception
from vmcloud.gateway import config
from tests import base


class ConfigTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('state_path', '/srv/gw', 'gateway')
        self.conf.set_override('listen_address', '10.0.0.5', 'gateway')
        self.conf.set_override('backend_slots', 3, 'gateway')
        self.paths = config.paths(self.conf)

    def sections(self) -> dict[str, list[str]]:
        """Section header -> its lines, stripped, comments left out."""
        found, current = {}, None
        for line in config.render(self.conf, self.paths, maxconn=5000).splitlines():
            if line and not line.startswith((' ', '#')):
                current = found.setdefault(line, [])
            elif line.strip() and not line.strip().startswith('#'):
                current.append(line.strip())
        return found


class RenderTest(ConfigTestCase):
    def test_global_and_defaults(self):
        sections = self.sections()
        self.assertIn('nbthread 1', sections['global'])
        self.assertIn('maxconn 5000', sections['global'])
        self.assertIn('stats socket /srv/gw/admin.sock level admin mode 600',
                      sections['global'])
        self.assertNotIn('hard-stop-after', '\n'.join(sections['global']))
        for line in ('timeout connect 5s', 'timeout client 1h', 'timeout server 1h',
                     'option dontlognull'):
            self.assertIn(line, sections['defaults'])

    def test_the_frontends_bind_the_ranges_and_read_the_maps(self):
        sections = self.sections()
        self.assertIn('bind 10.0.0.5:21000-21999', sections['frontend fe_http'])
        self.assertIn('bind 10.0.0.5:22000-22999', sections['frontend fe_tcp'])
        self.assertIn('mode http', sections['frontend fe_http'])
        self.assertIn('mode tcp', sections['frontend fe_tcp'])
        for frontend in ('frontend fe_http', 'frontend fe_tcp'):
            text = '\n'.join(sections[frontend])
            for name in config.MAPS:
                self.assertIn(f'map_int(/srv/gw/maps/{name}', text)
            self.assertIn('use_backend %[var(sess.slot)]', sections[frontend])

    def test_the_limit_is_checked_before_the_connection_is_counted(self):
        for frontend in ('frontend fe_http', 'frontend fe_tcp'):
            rules = self.sections()[frontend]
            checks = [i for i, rule in enumerate(rules) if 'table_conn_cur' in rule]
            counted = [i for i, rule in enumerate(rules) if 'track-sc0' in rule]
            self.assertEqual(2, len(checks))            # the cloud's and the application's
            self.assertLess(max(checks), min(counted))
            self.assertTrue(all('!cloud_over !app_over' in rules[i] for i in counted))
            self.assertIn('acl cloud_over var(sess.cloud_over) -m int ge 0', rules)
        tcp = self.sections()['frontend fe_tcp']
        self.assertIn('tcp-request connection reject if cloud_over || app_over', tcp)
        http = '\n'.join(self.sections()['frontend fe_http'])
        self.assertIn('http-request return status 503', http)
        self.assertIn('is at its connection limit', http)
        self.assertIn('hdr Connection close', http)

    def test_slots_and_tables(self):
        sections = self.sections()
        for protocol in config.PROTOCOLS:
            for index in range(3):
                backend = sections[f'backend {protocol}_slot{index}']
                self.assertIn(f'mode {protocol}', backend)
                self.assertIn('balance roundrobin', backend)
            self.assertNotIn(f'backend {protocol}_slot3', sections)
        self.assertIn('stick-table type string len 64 size 200k expire 10s '
                      'store conn_cur,gpt(2)', sections['backend st_conns'])
        for table in (config.TABLE_CLOUDS, config.TABLE_APPS, config.TABLE_REJECTS):
            self.assertIn(f'backend {table}', sections)

    def test_an_ipv6_listen_address_needs_no_brackets(self):
        self.conf.set_override('listen_address', '::', 'gateway')
        self.assertIn('bind :::21000-21999', self.sections()['frontend fe_http'])


class PortRangeTest(ConfigTestCase):
    def test_a_range(self):
        self.assertEqual(range(21000, 21010), config.port_range('21000-21009', 'x'))
        self.assertEqual(range(7, 8), config.port_range(' 7 - 7 ', 'x'))

    def test_malformed_ranges_name_the_option(self):
        for text in ('21000', '2-1', '0-10', '1-70000', 'a-b', ''):
            error = self.assertRaises(exception.ConfigError, config.port_range, text,
                                      'listener_ports')
            self.assertIn('listener_ports', str(error))

    def test_overlapping_ranges_are_refused(self):
        self.conf.set_override('tcp_listener_ports', '21900-22100', 'gateway')
        error = self.assertRaises(exception.ConfigError, config.render, self.conf,
                                  self.paths)
        self.assertIn('overlap', str(error))


class NamesTest(ConfigTestCase):
    def test_slots_and_paths(self):
        self.assertEqual('tcp_slot7', config.slot_name('tcp', 7))
        self.assertRaises(exception.GatewayError, config.slot_name, 'udp', 0)
        self.assertEqual(['http_slot0', 'http_slot1', 'http_slot2'],
                         config.slot_names(self.conf, 'http'))
        self.assertEqual('/srv/gw/maps/port-slot.map', self.paths.map(config.MAP_SLOT))
        self.assertRaises(exception.GatewayError, self.paths.map, 'other.map')
        self.assertEqual('/srv/gw/counters.json', self.paths.counters)

    def test_maxconn_fits_the_open_file_limit(self):
        maxconn = config.default_maxconn()
        self.assertGreaterEqual(maxconn, 1000)
        self.assertLessEqual(maxconn, config.MAX_CONNECTIONS)
