"""What the dispatcher answers when asked to show or list: rows as plain dicts."""
import datetime
import json


from vmcloud import exception
from vmcloud.db import api as db_api
from vmcloud.db import models
from vmcloud.dispatcher import networks
from vmcloud.dispatcher import states


def row(obj: models.Base) -> dict:
    """A row's columns, datetimes in ISO format (RPC results are JSON)."""
    result = {}
    for column in obj.__table__.columns:
        value = getattr(obj, column.key)
        result[column.key] = value.isoformat() if isinstance(value, datetime.datetime) else value
    return result


def deployment(session: db_api.Session, deployment_id: str,
               lock: bool = False) -> models.Deployment:
    """:raises: DeploymentNotFound."""
    found = db_api.deployment_get(session, deployment_id, lock)
    if found is None:
        raise exception.DeploymentNotFound(deployment_id)
    return found


def snapshot(session: db_api.Session, snapshot_id: str) -> models.Snapshot:
    """:raises: SnapshotNotFound (an InvalidRequest)."""
    found = db_api.snapshot_get(session, snapshot_id)
    if found is None:
        raise exception.SnapshotNotFound(snapshot_id)
    return found


def show_deployment(session: db_api.Session, deployment_id: str) -> dict:
    """With its network ({'id', 'vni', 'cidr'}, None once released or for a deployment
    of before networks) and each instance's 'address' and 'mac' (None without a port).

    :raises: DeploymentNotFound.
    """
    result = row(deployment(session, deployment_id))
    result['boot'] = json.loads(result['boot'])
    result['health'] = json.loads(result['health']) or {'kind': 'marker'}
    network = db_api.network_of(session, deployment_id)
    result['network'] = networks.show(network) if network is not None else None
    ports = networks.ports_by_instance(session, deployment_id)
    result['instances'] = [
        dict(row(i), address=ports[i.id].address if i.id in ports else None,
             mac=ports[i.id].mac if i.id in ports else None)
        for i in db_api.instances_of(session, deployment_id)]
    return result


def list_deployments(session: db_api.Session, limit: int | None = None,
                     marker: str | None = None, cloud: str | None = None,
                     owner: str | None = None) -> list[dict]:
    """Newest first (see db_api.deployments). :raises: MarkerNotFound."""
    return [row(d) for d in db_api.deployments(session, limit, marker, cloud, owner)]


def show_snapshot(session: db_api.Session, snapshot_id: str) -> dict:
    """With its items and ``replicated``/``persistent`` (snapshot_replicas).

    :raises: SnapshotNotFound.
    """
    found = snapshot(session, snapshot_id)
    result = row(found)
    names = {i.id: i.name for i in db_api.instances_of(session, result['deployment_id'])}
    items = db_api.snapshot_items(session, snapshot_id)
    result.update(snapshot_replicas(found, items))
    result['items'] = [dict(row(i), name=names.get(i.instance_id, '')) for i in items]
    return result


def snapshot_replicas(found: models.Snapshot, items: list[models.SnapshotItem]) -> dict:
    """{'replicated', 'persistent'} of a snapshot: replicated (deployable) once it ended
    available or partial with every item it stored replicated; persistent once every
    such item is in the repository too."""
    stored = [i for i in items if i.state == states.AVAILABLE]
    replicated = (found.state in (states.AVAILABLE, states.PARTIAL) and bool(stored)
                  and all(i.replicated for i in stored))
    return {'replicated': replicated,
            'persistent': replicated and all(i.persistent for i in stored)}
