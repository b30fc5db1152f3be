"""``/v1/snapshots``: the snapshots of deployments (taken with ``POST
/v1/deployments/{id}/snapshots``, deployed with ``POST /v1/deployments`` {"snapshot"}).
Reads for every user."""
from typing import Any

import fastapi
import pydantic

from vmcloud.api import applications
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import deployments
from vmcloud.api import pagination

router = fastapi.APIRouter(prefix='/v1/snapshots', tags=['snapshots'],
                           dependencies=[fastapi.Depends(auth.current_user)])
services_of = fastapi.Depends(context.services)
page_of = fastapi.Depends(pagination.params)


class SnapshotShown(deployments.Snapshot):
    items: list[dict[str, Any]] | None = pydantic.Field(
        None, description='One per instance: its state, the version stored, the bytes, '
                          'whether it is replicated and persistent')


class SnapshotBody(pydantic.BaseModel):
    snapshot: SnapshotShown


class SnapshotList(pydantic.BaseModel):
    snapshots: list[deployments.Snapshot]
    snapshots_links: list[applications.Link]


@router.get('', response_model=SnapshotList, response_model_exclude_unset=True)
def list_snapshots(request: fastapi.Request,
                   deployment: str | None = fastapi.Query(
                       None, min_length=1, max_length=deployments.MAX_ID,
                       description='Only the snapshots of this deployment'),
                   page: pagination.Page = page_of,
                   services: context.Services = services_of) -> dict:
    """Snapshots newest first.

    :raises: DeploymentNotFound (404) for an unknown ``deployment``.
    """
    rows = services.dispatcher.list_snapshots(deployment_id=deployment,
                                              limit=page.rows_wanted, marker=page.marker)
    return pagination.listed(request, 'snapshots', rows, page, 'id')


@router.get('/{snapshot_id}', response_model=SnapshotBody, response_model_exclude_unset=True)
def show_snapshot(snapshot_id: str = deployments.id_path(),
                  services: context.Services = services_of) -> dict:
    """:raises: SnapshotNotFound (404)."""
    return {'snapshot': services.dispatcher.show_snapshot(snapshot_id)}
