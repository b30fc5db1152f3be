from oslo_config import cfg

MIB = 1024 * 1024
GIB = 1024 * MIB

api_group = cfg.OptGroup(
    'api', title='REST API',
    help='`vmcloud api`: the HTTP REST service over the dispatcher, its dashboard and '
         'its /metrics. It keeps its users and tokens in the dispatcher\'s database '
         '([database] connection) and asks the dispatcher for everything else over RPC '
         '([DEFAULT] transport_url).')

api_opts = [
    cfg.HostAddressOpt('listen_address', default='127.0.0.1',
                       help='Address the API listens on. The API speaks plain HTTP: put '
                            'a TLS-terminating proxy in front of it to serve other '
                            'hosts.'),
    cfg.PortOpt('port', default=8780, help='TCP port the API listens on.'),
    cfg.IntOpt('token_ttl', default=3600, min=60,
               help='Seconds a token (and a dashboard session) stays valid after the '
                    'login that made it.'),
    cfg.IntOpt('max_body_bytes', default=MIB, min=1024,
               help='Largest request body taken, in bytes (checked on Content-Length and '
                    'on the bytes read): a larger one is refused with 413 before anything '
                    'is done. Image uploads have max_image_bytes instead.'),
    cfg.IntOpt('max_image_bytes', default=64 * GIB, min=MIB,
               help='Largest image file an upload (PUT /v1/images/NAME/file) may send, '
                    'in bytes.'),
    cfg.IntOpt('login_attempts', default=5, min=1,
               help='Failed logins allowed per user name, and per client address, within '
                    'login_window seconds; past them every login of that name or '
                    'address is refused (429) until the oldest failure is older than '
                    'the window. Counted in the API process\'s memory.'),
    cfg.IntOpt('login_window', default=60, min=1,
               help='Seconds over which failed logins are counted (see login_attempts).'),
    cfg.IntOpt('page_size', default=100, min=1,
               help='Items of a list page when the request gives no limit.'),
    cfg.IntOpt('max_page_size', default=1000, min=1,
               help='Largest limit a list request may ask for (a larger one is 422).'),
    cfg.BoolOpt('secure_cookies', default=False,
                help='Mark the dashboard\'s cookies Secure (sent over HTTPS only): set it '
                     'when a TLS proxy serves the API.'),
    cfg.FloatOpt('monitor_interval', default=1.0, min=0.1,
                 help='Seconds between two samples of the monitoring history (the '
                      'dashboard\'s charts).'),
    cfg.IntOpt('history_length', default=600, min=1,
               help='Samples of the monitoring history kept (in memory).'),
    cfg.FloatOpt('live_max_age', default=0.2, min=0.0,
                 help='Seconds a monitoring answer is reused for other requests: '
                      'dashboards polling together cost the dispatcher and the gateway '
                      'one question per this long.'),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_group(api_group)
    conf.register_opts(api_opts, group=api_group)


def list_opts() -> dict:
    return {api_group: api_opts}
