"""The dashboard's forms read into the dispatcher's arguments, and back.

Only what HTML forms cannot say is checked here (a number field sent as text, a health
check spread over several fields); every rule on the values themselves is the
dispatcher's (or the API's request models), whose message the form shows.
"""
from starlette import datastructures

from vmcloud import exception

HEALTH_KINDS = ('marker', 'tcp', 'http', 'console')
APPLICATION_FIELDS = ('name', 'image', 'port', 'protocol', 'vcpus', 'memory_mib', 'kernel',
                      'initrd', 'cmdline', 'health_kind', 'health_port', 'health_path',
                      'health_pattern', 'health_timeout', 'connection_limit')


def text(form: datastructures.FormData, field: str) -> str:
    value = form.get(field, '')
    return value.strip() if isinstance(value, str) else ''


def values(form: datastructures.FormData, fields: tuple[str, ...]) -> dict[str, str]:
    """The fields as typed, to show the form again with them."""
    return {field: text(form, field) for field in fields}


def whole_number(form: datastructures.FormData, field: str, label: str,
                 required: bool = True) -> int | None:
    """:returns: None for an empty optional field.
    :raises: InvalidRequest naming ``label`` if it is not a whole number."""
    typed = text(form, field)
    if not typed and not required:
        return None
    try:
        return int(typed, 10)
    except ValueError:
        raise exception.InvalidRequest(f'{label} {typed!r} is not a whole number') from None


def _seconds(form: datastructures.FormData, field: str, label: str) -> float | None:
    typed = text(form, field)
    if not typed:
        return None
    try:
        return float(typed)
    except ValueError:
        raise exception.InvalidRequest(f'{label} {typed!r} is not a number of seconds') \
            from None


def boot(form: datastructures.FormData) -> dict:
    """{'kernel', 'initrd', 'cmdline'}, those filled in."""
    return {key: text(form, key) for key in ('kernel', 'initrd', 'cmdline') if text(form, key)}


def health(form: datastructures.FormData) -> dict:
    """The health check of the fields health_kind, health_port, health_path,
    health_pattern and health_timeout (the dispatcher checks the values).

    :raises: InvalidRequest for an unknown kind or a port or timeout that is no number.
    """
    kind = text(form, 'health_kind') or 'marker'
    if kind not in HEALTH_KINDS:
        raise exception.InvalidRequest(f'health check {kind!r} is not one of '
                                       f'{", ".join(HEALTH_KINDS)}')
    check: dict = {'kind': kind}
    if kind in ('tcp', 'http'):
        check['port'] = whole_number(form, 'health_port', 'health check port')
    if kind == 'http':
        check['path'] = text(form, 'health_path') or '/'
    if kind == 'console':
        check['pattern'] = text(form, 'health_pattern')
    timeout = _seconds(form, 'health_timeout', 'health check timeout')
    if timeout is not None:
        check['timeout'] = timeout
    return check


def application(form: datastructures.FormData) -> dict:
    """create_application's arguments but the name.

    :raises: InvalidRequest naming the first field that is no number where one must be.
    """
    return {'image': text(form, 'image'),
            'port': whole_number(form, 'port', 'service port'),
            'protocol': text(form, 'protocol'),
            'vcpus': whole_number(form, 'vcpus', 'vCPUs'),
            'memory_mib': whole_number(form, 'memory_mib', 'memory (MiB)'),
            'boot': boot(form), 'health': health(form),
            'connection_limit': whole_number(form, 'connection_limit', 'connection limit',
                                             required=False)}


def application_changes(current: dict, wanted: dict) -> dict:
    """update_application's changes: the fields of ``wanted`` that differ from the
    application as it is (a health check shown as the default marker is no change)."""
    changes = {}
    for key, value in wanted.items():
        now = current.get(key)
        if key == 'health':
            now = now or {'kind': 'marker'}
        if key == 'boot':
            now = now or {}
        if value != now:
            changes[key] = value
    return changes


def application_values(application: dict) -> dict[str, str]:
    """An application as its form shows it."""
    boot = application.get('boot') or {}
    check = application.get('health') or {'kind': 'marker'}

    def shown(value) -> str:
        return '' if value is None else str(value)
    return {'name': application['name'], 'image': application['image'],
            'port': shown(application.get('port')),
            'protocol': shown(application.get('protocol')),
            'vcpus': shown(application.get('vcpus')),
            'memory_mib': shown(application.get('memory_mib')),
            'kernel': shown(boot.get('kernel')), 'initrd': shown(boot.get('initrd')),
            'cmdline': shown(boot.get('cmdline')),
            'health_kind': shown(check.get('kind', 'marker')),
            'health_port': shown(check.get('port')),
            'health_path': shown(check.get('path')),
            'health_pattern': shown(check.get('pattern')),
            'health_timeout': shown(check.get('timeout')),
            'connection_limit': shown(application.get('connection_limit'))}


def application_defaults() -> dict[str, str]:
    """A new application's form."""
    return dict.fromkeys(APPLICATION_FIELDS, '') | {
        'protocol': 'http', 'vcpus': '1', 'memory_mib': '256', 'health_kind': 'marker'}
