"""The warehouse service: one Backend served over HTTP to compute nodes and the CLI.

``protocol`` is shared with the client (``vmcloud.storage.backends.http``) and
imports nothing of the server's stack; ``app``, ``auth``, ``leases`` and
``server`` are the service itself (aiohttp).
"""
