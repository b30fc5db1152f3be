"""``/v1/images``: the warehouse's images (list, show) and uploads of new ones.

An upload (``PUT /v1/images/{name}/file``, admins) streams the request body to a
temporary file where the warehouse converts (its scratch space, else the system's
temporary directory), at most ``[api] max_image_bytes`` (413 past it), then imports it
as the warehouse imports any untrusted file: inspected before qemu-img reads it (422 if
refused, and nothing stored). The file goes whatever happens. An image that exists is
409 (ImageExists): versions of it come from snapshots.

The endpoints are ``def``: the upload's writing and importing run in a worker thread,
the event loop serving other requests meanwhile.
"""
import contextlib
import errno
import os
import tempfile
import urllib.parse
from typing import Any, Literal

import anyio.from_thread
import fastapi
import pydantic

from vmcloud import exception
from vmcloud.api import applications
from vmcloud.api import auth
from vmcloud.api import context
from vmcloud.api import pagination
from vmcloud.storage import warehouse as warehouse_mod
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import ManifestSummary

router = fastapi.APIRouter(prefix='/v1/images', tags=['images'],
                           dependencies=[fastapi.Depends(auth.current_user)])
services_of = fastapi.Depends(context.services)
page_of = fastapi.Depends(pagination.params)


def name_path():
    """The path parameter naming an image (a new one for each route: FastAPI names the
    parameter in it)."""
    return fastapi.Path(pattern=applications.IMAGE_NAME,
                        description='1 to 128 of A-Z a-z 0-9 . _ -, starting with a '
                                    'letter or digit')


UPLOAD_PREFIX = 'api-upload-'
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


class Version(applications.Shown):
    image: str
    version: int
    parent: str | None = pydantic.Field(None, description='IMAGE:VERSION it is a '
                                                          'snapshot of')
    size: int = pydantic.Field(description='Virtual size in bytes')
    chunk_size: int
    data_chunks: int
    holes: int
    created_at: str | None = None


class DamagedVersion(pydantic.BaseModel):
    version: int
    problem: str


class Image(applications.Shown):
    name: str
    latest: int | None = pydantic.Field(description='Its latest readable version')
    size: int | None = pydantic.Field(description='The latest version\'s size in bytes')
    created_at: str | None = None
    versions: list[Version] = pydantic.Field(description='Latest first')
    damaged: list[DamagedVersion] = pydantic.Field(
        [], description='Versions whose manifest cannot be read')


class ImageBody(pydantic.BaseModel):
    image: Image


class ImageList(pydantic.BaseModel):
    images: list[Image]
    images_links: list[applications.Link]


class UploadedVersion(Version):
    stored_bytes: int = pydantic.Field(description='Bytes it added to the store (after '
                                                   'deduplication)')


class UploadBody(pydantic.BaseModel):
    image: UploadedVersion


def version_row(version: Manifest | ManifestSummary) -> dict:
    """A version as the API shows it."""
    summary = version.summary() if isinstance(version, Manifest) else version
    return {'image': summary.image, 'version': summary.version,
            'parent': str(summary.parent) if summary.parent else None,
            'size': summary.size, 'chunk_size': summary.chunk_size,
            'data_chunks': summary.data_chunks,
            'holes': summary.chunk_count - summary.data_chunks,
            'created_at': summary.created_at or None}


def image_row(name: str, summaries: list, damaged: dict[int, str]) -> dict:
    """An image from its readable versions' summaries and its damaged ones."""
    versions = sorted(summaries, key=lambda s: s.version, reverse=True)
    latest = versions[0] if versions else None
    return {'name': name, 'latest': latest.version if latest else None,
            'size': latest.size if latest else None,
            'created_at': (latest.created_at or None) if latest else None,
            'versions': [version_row(s) for s in versions],
            'damaged': [{'version': v, 'problem': p} for v, p in sorted(damaged.items())]}


def images(warehouse: warehouse_mod.Warehouse) -> list[dict]:
    """Every image by name (one damaged manifest hides nothing else)."""
    listing = warehouse.listing()
    summaries: dict[str, list] = {}
    damaged: dict[str, dict[int, str]] = {}
    for summary in listing.versions:
        summaries.setdefault(summary.image, []).append(summary)
    for ref, problem in listing.damaged.items():
        damaged.setdefault(ref.image, {})[ref.version] = problem
    return [image_row(name, summaries.get(name, []), damaged.get(name, {}))
            for name in sorted(set(summaries) | set(damaged))]


def image(warehouse: warehouse_mod.Warehouse, name: str) -> dict:
    """:raises: ImageNotFound."""
    summaries, damaged = [], {}
    for version in warehouse.backend.list_versions(name):
        try:
            summaries.append(warehouse.summary(name, version))
        except exception.ImageNotFound:
            continue  # deleted meanwhile
        except exception.StorageError as exc:
            damaged[version] = str(exc)
    if not summaries and not damaged:
        raise exception.ImageNotFound(name)
    return image_row(name, summaries, damaged)


@router.get('', response_model=ImageList, response_model_exclude_unset=True)
def list_images(request: fastapi.Request, page: pagination.Page = page_of,
                services: context.Services = services_of) -> dict:
    """Images by name, each with its versions."""
    rows = pagination.paged_list(images(services.warehouse()), page, 'name')
    return pagination.listed(request, 'images', rows, page, 'name')


@router.get('/{name}', response_model=ImageBody, response_model_exclude_unset=True)
def show_image(name: str = name_path(), services: context.Services = services_of) -> dict:
    """:raises: ImageNotFound (404)."""
    return {'image': image(services.warehouse(), name)}


# -- upload ----------------------------------------------------------------------------

def _too_large(limit: int) -> fastapi.HTTPException:
    return fastapi.HTTPException(413, f'the image is larger than {limit} bytes ([api] '
                                      f'max_image_bytes)')


async def _next_block(blocks) -> bytes | None:
    try:
        return await blocks.__anext__()
    except StopAsyncIteration:
        return None


def receive(request: fastapi.Request, directory: str | None, limit: int) -> str:
    """The request's body in a new file of ``directory`` (None: the system's temporary
    directory), read from this worker thread through the event loop.

    :returns: the file's path (the caller's to delete).
    :raises: HTTPException 413 past ``limit`` bytes; ScratchSpaceExhausted if the disk
        fills; StorageError if the file cannot be written; ClientDisconnect. The file
        is gone on any error.
    """
    announced = request.headers.get('content-length', '').strip()
    if announced.isdigit() and int(announced) > limit:
        raise _too_large(limit)
    where = directory or tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix='.img', dir=directory)
    blocks = request.stream()
    try:
        with os.fdopen(fd, 'wb') as f:
            received = 0
            while (block := anyio.from_thread.run(_next_block, blocks)) is not None:
                received += len(block)
                if received > limit:
                    raise _too_large(limit)
                f.write(block)
    except OSError as exc:
        os.unlink(path)
        if exc.errno in _FULL_DISK:
            raise exception.ScratchSpaceExhausted(
                f'no room for the upload in {where}: {exc.strerror}') from exc
        raise exception.StorageError(f'cannot keep the upload in {where}: {exc}') from exc
    except BaseException:
        os.unlink(path)
        raise
    finally:
        anyio.from_thread.run(blocks.aclose)
    return path


def upload(warehouse: warehouse_mod.Warehouse, request: fastapi.Request, name: str,
           fmt: str | None, limit: int) -> dict:
    """Receive the image and import it as version 1 of ``name``.

    :returns: the version stored, with 'stored_bytes'.
    :raises: ImageExists, UnsafeImage (naming the upload, not the temporary file), as
        ``receive`` and Warehouse.import_image.
    """
    if name in warehouse.images():  # refused before the body is read, not after
        raise exception.ImageExists(name)
    backend = warehouse.backend
    directory = backend.scratch_dir()
    # What is left in the scratch space counts as abandoned (gc purges it) unless a
    # writer holds the shared lock.
    with backend.shared_lock() if directory is not None else contextlib.nullcontext():
        path = receive(request, directory, limit)
        try:
            result = warehouse.import_image(path, name, fmt)
        except exception.UnsafeImage as exc:
            raise exception.UnsafeImage(str(exc).replace(path, f'upload of {name}')) from exc
        finally:
            os.unlink(path)
    return dict(version_row(result.manifest), stored_bytes=result.new_bytes)


_BINARY_BODY: dict[str, Any] = {'requestBody': {
    'required': True, 'description': 'The image file (raw or qcow2)',
    'content': {'application/octet-stream': {'schema': {'type': 'string',
                                                        'format': 'binary'}}}}}


@router.put('/{name}/file', status_code=201, dependencies=[fastapi.Depends(auth.require_admin)],
            response_model=UploadBody, response_model_exclude_unset=True,
            openapi_extra=_BINARY_BODY)
def upload_image(request: fastapi.Request, response: fastapi.Response,
                 name: str = name_path(),
                 format: Literal['raw', 'qcow2'] | None = fastapi.Query(
                     None, description='The file\'s format; refused if it is another '
                                       '(default: as inspection finds it)'),
                 services: context.Services = services_of) -> dict:
    """Upload a new image: the body is the file (at most [api] max_image_bytes).

    :raises: ImageExists (409), UnsafeImage (422), 413 past the limit.
    """
    version = upload(services.warehouse(), request, name, format,
                     services.conf.api.max_image_bytes)
    response.headers['Location'] = f'{router.prefix}/{urllib.parse.quote(name, safe="")}'
    return {'image': version}
