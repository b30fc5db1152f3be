"""``vmcloud api``: the REST API over the dispatcher (FastAPI under uvicorn), its web
dashboard and its Prometheus metrics.

Only vmcloud.cmd imports this package; it knows the dispatcher by its RPC client
(vmcloud.dispatcher.rpcapi) and its states alone, and reaches the database for its own
two tables (users and tokens) only, through vmcloud.db.api.
"""
