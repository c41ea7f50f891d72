"""The batch routes: POST /api/batches (JSON or JSON Lines), GET /api/batches and /api/batches/{batchId}.

A submitted batch is stored in the ledger, item by item, before the 202; its chunks are then signed by the
queue handler (function_app.py's queue trigger, or the embedded server's in-process worker). Only the
submitter or an admin reads a batch: another factory gets the 404 of a batch that does not exist.
"""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from .. import parameters
from ..errors import CaError
from ..jsonlines import JsonLines, read_batch_object, read_json_lines, wide_encoding
from ..service.batches import MAX_BATCH_ITEMS
from ..views import batch_result_view, batch_view
from . import models
from .auth import AnyCaller, Service, any_caller, service_of
from .errors import UnsupportedMediaType
from .routes import ApiRoute

# 10,000 P-384 CSRs with 64-character device IDs take about 6.2 MB as compact JSON (620 bytes an item);
# 10 MiB leaves room for pretty-printing, longer PEM lines and a CSR's extra attributes.
BATCH_BODY_LIMIT = 10 * 1024 * 1024
JSON_LINES = ("application/jsonl", "application/x-ndjson", "application/jsonlines", "application/x-jsonlines")
BATCHES_PATH = "/api/batches"

batches = APIRouter(route_class=ApiRoute, redirect_slashes=False)


@batches.post(
    BATCHES_PATH,
    status_code=202,
    response_model=models.Batch,
    tags=["batches"],
    summary="sign up to 10,000 device CSRs through the queue (factory or admin)",
    description=(
        'A JSON object `{"items": [{"deviceId", "csr"}, ...], "intermediateId"?}`, or JSON Lines '
        '(`application/jsonl`, one `{"deviceId", "csr"}` a line; the intermediate as `?intermediateId=`). '
        f"1 to {MAX_BATCH_ITEMS} items, a body of at most {BATCH_BODY_LIMIT} bytes. Every item is stored "
        "before the answer: 202 with `Location` and the batch. An item that is not an object with a device "
        "ID and a CSR, or whose CSR the CA refuses, fails alone with its reason; the rules are those of "
        "one CSR (ownership, policy, the same CSR's certificate given back)."
    ),
    responses={202: {"model": models.Batch, "description": "stored and queued"}},
    openapi_extra={
        "parameters": [
            {
                "name": "intermediateId",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "sign with this intermediate (default: the newest active one the caller may use)",
            }
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": models.BatchRequest.model_json_schema()},
                **{media: {"schema": {"type": "string"}} for media in JSON_LINES},
            },
        },
    },
)
async def submit_batch(request: Request) -> Response:
    caller = await any_caller(request)  # before the body is read
    items, body_intermediate, lines = _read_items(_media_type(request), await request.body())
    query_intermediate = request.query_params.get("intermediateId")
    if query_intermediate is not None:
        parameters.ca_id(query_intermediate)  # "?intermediateId=" (empty) names no CA: not the default
    if body_intermediate and query_intermediate and body_intermediate != query_intermediate:
        raise CaError("intermediateId differs between the query and the body", "conflicting-parameters")
    summary = await asyncio.to_thread(
        service_of(request).submit_batch,
        items,
        requested_by=caller.id,
        allowed_intermediates=caller.intermediates,
        intermediate_id=query_intermediate or body_intermediate,
        lines=lines,
    )
    return JSONResponse(
        batch_view(summary), status_code=202, headers={"Location": f"{BATCHES_PATH}/{summary.record.id}"}
    )


@batches.get(
    BATCHES_PATH,
    response_model=models.BatchList,
    tags=["batches"],
    summary="list batches in the order they were accepted (admin: all; factory: its own)",
)
def list_batches(
    caller: AnyCaller,
    service: Service,
    limit: Annotated[models.PageLimit, Query()] = parameters.DEFAULT_PAGE,
    cursor: Annotated[models.Cursor | None, Query()] = None,
) -> dict[str, Any]:
    page = service.batches(None if caller.is_admin else caller.id, limit, cursor)
    return {"items": [batch_view(summary) for summary in page.items], "nextCursor": page.next_cursor}


@batches.get(
    BATCHES_PATH + "/{batchId}",
    response_model=None,
    responses={200: {"model": models.BatchWithResults, "description": "the batch and a page of its results"}},
    tags=["batches"],
    summary="a batch's progress and a page of its results (the submitter or an admin)",
    description=(
        "Status (`queued`, `running`, `done`, `done-with-failures`), counts and timing, and `limit` results "
        "from `cursor` on (from `nextCursor`) in submission order: each a device bundle, an error, or pending."
    ),
)
def get_batch(
    batch_id: Annotated[str, Path(alias="batchId")],
    caller: AnyCaller,
    service: Service,
    limit: Annotated[models.PageLimit, Query()] = parameters.DEFAULT_PAGE,
    cursor: Annotated[models.Cursor | None, Query()] = None,
) -> JSONResponse:
    page = service.batch_results(batch_id, None if caller.is_admin else caller.id, limit=limit, cursor=cursor)
    document = {
        **batch_view(page.summary),
        "results": [batch_result_view(result) for result in page.results],
        "nextCursor": page.next_cursor,
    }
    return JSONResponse(document)


def _read_items(media: str, body: bytes) -> tuple[list[Any], str | None, list[int] | None]:
    """The items of a JSON or JSON Lines body, the body's intermediateId, and for JSON Lines each item's line
    number. A body that is neither, or JSON that is not `{"items": [...]}`, is a 400; a JSON Lines line that
    is not JSON (or not UTF-8) is that item's failure, and every error about a JSON Lines body names its line."""
    wide = wide_encoding(body)
    if wide and (media in JSON_LINES or media == "application/json" or media.endswith("+json")):
        raise CaError(f"the body is {wide} text: send it as UTF-8 (RFC 8259 §8.1)", "invalid-request")
    if media in JSON_LINES:
        read = _read_json_lines(body)
        return read.items, None, read.lines
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the batch as application/json or JSON Lines ({', '.join(JSON_LINES)}), "
            f"not {media or 'a body without Content-Type'}"
        )
    items, intermediate = read_batch_object(body)
    return items, intermediate, None


def _read_json_lines(body: bytes) -> JsonLines:
    """A JSON Lines body's items (shared.jsonlines, as `sign-batch` reads a file); its errors name a line."""
    read = read_json_lines(body)
    if not read.items:
        raise CaError("a batch needs at least one item: every line of the body is blank", "empty-batch")
    if len(read.items) > MAX_BATCH_ITEMS:
        raise CaError(
            f"a batch holds at most {MAX_BATCH_ITEMS} items, not {len(read.items)}: "
            f"the first item over is on line {read.lines[MAX_BATCH_ITEMS]}",
            "too-many-items",
        )
    return read


def _media_type(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
