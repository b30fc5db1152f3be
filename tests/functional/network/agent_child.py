"""One network agent call in a child process (run inside an emulated host):

    python -m tests.functional.network.agent_child '{"state_dir": ..., "vtep": ...,
        "host": "h1", "call": "plug", "args": [...]}'

prints the result as JSON; exits 1 with the error on stderr."""
import json
import sys

import vmcloud.conf
from vmcloud import exception
from vmcloud.network import agent as agent_mod


def main() -> int:
    request = json.loads(sys.argv[1])
    conf = vmcloud.conf.CONF
    conf([], project='vmcloud', default_config_files=[])
    conf.set_override('state_path', request['state_dir'])
    conf.set_override('host', request.get('host', 'h'))
    conf.set_override('state_dir', request['state_dir'], group='network')
    conf.set_override('vtep_address', request.get('vtep', ''), group='network')
    agent = agent_mod.NetworkAgent(conf)
    args = request.get('args', [])
    if request['call'] == 'reconcile':
        args = [{k: set(v) for k, v in args[0].items()}]
    try:
        result = getattr(agent, request['call'])(*args)
    except exception.NetworkError as exc:
        print(f'{type(exc).__name__}: {exc}', file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    return 0


if __name__ == '__main__':
    sys.exit(main())
