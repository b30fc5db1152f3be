"""Lists come in pages, as OpenStack's do: ``?limit=N&marker=KEY``, KEY the key of the
last item of the previous page (a name, or an id for deployments and snapshots), and a
``next`` link while there is more:

    {"clouds": [...], "clouds_links": [{"rel": "next",
                                        "href": "/v1/clouds?limit=100&marker=LAST"}]}

The dispatcher is asked for ``limit + 1`` rows: the extra one says whether a next page
exists, and is not shown.
"""
import dataclasses
import urllib.parse

import fastapi
from fastapi import exceptions as fastapi_exceptions

from vmcloud import exception
from vmcloud.api import context


@dataclasses.dataclass
class Page:
    limit: int
    marker: str | None

    @property
    def rows_wanted(self) -> int:
        """What to ask the dispatcher for: one more than shown (is there a next page?)."""
        return self.limit + 1


def params(limit: int | None = fastapi.Query(None, ge=1, description='Items per page '
                                             '(default [api] page_size, at most [api] '
                                             'max_page_size)'),
           marker: str | None = fastapi.Query(None, min_length=1, max_length=255,
                                              description='The key of the last item of '
                                                          'the previous page'),
           services: context.Services = fastapi.Depends(context.services)) -> Page:
    """FastAPI dependency: the page asked for.

    :raises: RequestValidationError (422) for a limit above ``[api] max_page_size``.
    """
    largest = services.conf.api.max_page_size
    if limit is not None and limit > largest:
        raise fastapi_exceptions.RequestValidationError([{
            'type': 'less_than_equal', 'loc': ('query', 'limit'),
            'msg': f'Input should be less than or equal to {largest}', 'input': limit,
            'ctx': {'le': largest}}])
    return Page(limit=min(services.conf.api.page_size, largest) if limit is None else limit,
                marker=marker)


def split(rows: list[dict], page: Page, key: str) -> tuple[list[dict], str | None]:
    """The ``page`` of ``rows`` (up to ``page.rows_wanted`` of them, in the list's
    order, as the dispatcher answers): its first ``page.limit``, and the marker of the
    next page (the ``key`` of the last one shown), None on the last page."""
    shown = rows[:page.limit]
    if len(rows) > page.limit and shown:
        return shown, str(shown[-1][key])
    return shown, None


def listed(request: fastapi.Request, collection: str, rows: list[dict], page: Page,
           key: str) -> dict:
    """The list body of ``rows`` (up to ``page.limit + 1`` of them, in the list's order):
    the first ``page.limit``, and a next link, keeping the request's other query
    parameters, if there were more."""
    shown, marker = split(rows, page, key)
    links = []
    if marker is not None:
        links.append({'rel': 'next', 'href': next_href(request, page.limit, marker)})
    return {collection: shown, f'{collection}_links': links}


def next_href(request: fastapi.Request, limit: int, marker: str) -> str:
    kept = [(name, value) for name, value in request.query_params.multi_items()
            if name not in ('limit', 'marker')]
    query = urllib.parse.urlencode(kept + [('limit', limit), ('marker', marker)])
    return f'{request.url.path}?{query}'


def paged_list(rows: list[dict], page: Page, key: str) -> list[dict]:
    """A page of a short list the API holds whole (images), as the dispatcher pages
    its lists: up to ``page.limit + 1`` rows after the one whose ``key`` is the marker
    (``rows`` in the list's order), for ``listed``.

    :raises: MarkerNotFound if no row has the marker.
    """
    start = 0
    if page.marker is not None:
        at = next((i for i, row in enumerate(rows) if row[key] == page.marker), None)
        if at is None:
            raise exception.MarkerNotFound(page.marker)
        start = at + 1
    return rows[start:start + page.rows_wanted]
