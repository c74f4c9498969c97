"""The HTTP layer of `maisi2 serve`: FastAPI routes, each a thin call to a `Workspace` function.

Access: every route except the static page assets needs the server's token, given as
``?token=`` (the URL `maisi2 serve` prints, as Jupyter does), an ``X-Maisi2-Token`` header, or
the cookie the page sets when opened with the token (SameSite=Strict, so other web sites
cannot make a browser send it). User errors (what the CLI reports as one line) come back as
HTTP 400 ``{"error": message}``, and so do malformed requests (a field that is not a number, a
spacing of two values: one line naming the field, as argparse names an option), unknown ids as
404, uploads over the limit as 413.

Usage::

    app = create_app(Workspace("out/"), token="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from importlib import resources
from typing import Optional

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from maisi2.web.jobs import USER_ERRORS, NotFound, _message
from maisi2.web.workspace import (PRECISIONS, RESULT_FILES, WINDOW_PRESETS, GenerationSettings, UploadTooLarge,
                                  Workspace)

__all__ = ["create_app", "COOKIE", "HEADER"]

COOKIE, HEADER = "maisi2_token", "X-Maisi2-Token"


# -- request bodies -------------------------------------------------------------------------------

class ImportRequest(BaseModel):
    label_map: Optional[str] = None  # an upload id: a MAISI label map
    totalseg: Optional[str] = None  # an upload id: a TotalSegmentator 'total' map
    ct: Optional[str] = None  # an upload id: the CT of that map (optional)
    version: Optional[str] = None  # the TotalSegmentator numbering, v1 or v2 (None: detect it)


class PhantomRequest(BaseModel):
    shape: list[int] = Field(default=[128, 128, 96], min_length=3, max_length=3)
    spacing: list[float] = Field(default=[3.0, 3.0, 3.0], min_length=3, max_length=3)
    seed: int = 0
    tumors: list[str] = []  # e.g. ["hepatic:1"]


class LibraryRequest(BaseModel):
    file: str  # an entry of the library's index


class MaskIntent(BaseModel):
    region: Optional[str] = None
    anatomy: list[str] = []
    size: Optional[list[int]] = Field(default=None, min_length=3, max_length=3)
    spacing: Optional[list[float]] = Field(default=None, min_length=3, max_length=3)
    seed: int = 0


class EditRequest(BaseModel):
    op: str  # add, remove, scale
    kind: Optional[str] = None  # add: the kind added; remove / scale: every tumour of it, or with `at` a filter
    at: Optional[list[int]] = Field(default=None, min_length=3, max_length=3)  # the clicked voxel
    radius_mm: Optional[float] = None
    factor: Optional[float] = None
    within_mm: Optional[float] = None  # remove / scale at: how far from `at` the tumour may be


class JobRequest(BaseModel):
    mask: str
    steps: int = 30
    seed: int = 0
    spacing: Optional[list[float]] = Field(default=None, min_length=3, max_length=3)
    precision: str = "auto"
    model: str = "bundled"
    qc_retries: int = 0
    force: bool = False  # the CLI's --force
    fit_to_model: bool = False  # the CLI's --fit-to-model


# -- the app ----------------------------------------------------------------------------------------

def create_app(workspace: Workspace, token: str) -> FastAPI:
    """The web app over `workspace`; `token` guards every route but the static page assets."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(workspace.close)  # server stop: cancel jobs, wait, nothing half-written

    app = FastAPI(title="maisi2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(resources.files("maisi2.web") / "static")), name="static")

    def authorised(request: Request) -> None:
        given = request.headers.get(HEADER) or request.cookies.get(COOKIE) or request.query_params.get("token")
        if not given or not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "this maisi2 server needs its access token: open the URL that "
                                     "`maisi2 serve` printed (it ends in ?token=...)")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def malformed(request, exc: RequestValidationError):
        return JSONResponse({"error": validation_message(exc.errors())}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        query = request.query_params.get("token")
        if query is not None:  # the printed URL: keep the token in a cookie, drop it from the address bar
            authorised(request)
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return response
        authorised(request)
        return HTMLResponse((resources.files("maisi2.web") / "static" / "index.html").read_text())

    api = _api_routes(workspace)
    app.include_router(api, prefix="/api", dependencies=[Depends(authorised)])
    return app


def _api_routes(ws: Workspace):
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/options")
    def options():
        from maisi2.labels import TUMOR_KINDS

        return {"models": list(ws.models), "tumor_kinds": list(TUMOR_KINDS), "windows": WINDOW_PRESETS,
                "precisions": list(PRECISIONS), "defaults": GenerationSettings().__dict__,
                "max_upload_bytes": ws.max_upload_bytes, "result_files": list(RESULT_FILES),
                "library": str(ws.library) if ws.library is not None else "bundled"}

    @router.post("/uploads")
    async def upload(request: Request, name: str):
        declared = request.headers.get("content-length", "")
        try:
            with ws.new_upload(name, int(declared) if declared.isdigit() else None) as upload:
                async for chunk in request.stream():
                    upload.write(chunk)
        except UploadTooLarge as err:
            raise HTTPException(413, str(err)) from None
        except USER_ERRORS as err:
            raise HTTPException(400, str(err)) from None
        return {"upload": upload.id}

    @router.post("/masks/import")
    async def import_mask(body: ImportRequest):
        if (body.label_map is None) == (body.totalseg is None):
            raise HTTPException(400, "give either a MAISI label map or a TotalSegmentator map to import")
        if body.label_map is not None:
            return _record(await _call(ws.import_label_map, body.label_map))
        return _record(await _call(ws.import_totalseg, body.totalseg, body.ct, body.version))

    @router.post("/masks/phantom")
    async def phantom(body: PhantomRequest):
        return _record(await _call(ws.add_phantom, body.shape, body.spacing, body.seed, body.tumors))

    @router.get("/library")
    async def library():
        return await _call(ws.library_entries)

    @router.post("/masks/library")
    async def from_library(body: LibraryRequest):
        return _record(await _call(ws.add_from_library, body.file))

    @router.post("/masks/request")
    async def from_request(body: MaskIntent):
        return _record(await _call(ws.request_mask, body.region, body.anatomy, body.size, body.spacing, body.seed))

    @router.get("/masks")
    def masks():
        return [_record(m) for m in ws.masks()]

    @router.post("/masks/{mask_id}/edit")
    async def edit(mask_id: str, body: EditRequest):
        return _record(await _call(ws.edit_mask, mask_id, body.model_dump(exclude_none=True)))

    @router.get("/masks/{mask_id}/download")
    async def mask_download(mask_id: str):
        path = await _call(ws.mask_path, mask_id)
        return FileResponse(path, filename=f"maisi2_mask_{mask_id}.nii.gz", media_type="application/gzip")

    @router.get("/view/{kind}/{item_id}")
    async def describe(kind: str, item_id: str):
        return await _call(ws.describe, kind, item_id)

    @router.get("/view/{kind}/{item_id}/slice")
    async def view_slice(kind: str, item_id: str, layer: str, axis: int, index: int):
        array = await _call(ws.view_slice, kind, item_id, layer, axis, index)
        return Response(array.astype(array.dtype.newbyteorder("<")).tobytes(), media_type="application/octet-stream",
                        headers={"X-Shape": ",".join(map(str, array.shape)), "X-Dtype": array.dtype.name,
                                 "Cache-Control": "no-store"})

    @router.post("/jobs")
    async def submit(body: JobRequest):
        settings = GenerationSettings(steps=body.steps, seed=body.seed,
                                      spacing=None if body.spacing is None else tuple(body.spacing),
                                      precision=body.precision, model=body.model, qc_retries=body.qc_retries,
                                      force=body.force, fit_to_model=body.fit_to_model)
        job = await _call(ws.submit, body.mask, settings)
        return {**job.to_dict(), "position": ws.queue.position(job)}

    @router.get("/jobs")
    def jobs():
        return ws.jobs()

    @router.post("/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        return (await _call(ws.cancel, job_id)).to_dict()

    @router.get("/results")
    def results():
        return ws.results()

    @router.get("/results/{result_id}")
    async def result(result_id: str):
        return await _call(ws.result, result_id)

    @router.get("/results/{result_id}/files/{kind}")
    async def download(result_id: str, kind: str):
        path = await _call(ws.result_file, result_id, kind)
        media = {"report": "application/json", "preview": "image/png"}.get(kind, "application/gzip")
        return FileResponse(path, filename=f"maisi2_{result_id}_{path.name}", media_type=media)

    return router


async def _call(fn, *args):
    """Run a workspace function in a worker thread; its user errors become 400, unknown ids 404
    (any other exception is a bug: a 500 with its traceback in the log)."""
    try:
        return await run_in_threadpool(fn, *args)
    except NotFound as err:
        raise HTTPException(404, _message(err)) from None
    except USER_ERRORS as err:
        raise HTTPException(400, _message(err)) from None


# pydantic's error types -> what the field must be, in the words of the CLI's refusals.
_MUST_BE = {"int_parsing": "a whole number", "int_from_float": "a whole number", "int_type": "a whole number",
            "float_parsing": "a number", "float_type": "a number", "finite_number": "a finite number",
            "bool_parsing": "true or false", "bool_type": "true or false", "string_type": "text",
            "list_type": "a list"}


def validation_message(errors: list[dict]) -> str:
    """One line for a request FastAPI could not read: the first field at fault, what it must be, and
    what was given (e.g. "steps must be a whole number, got 'abc'")."""
    if not errors:
        return "the request could not be read"
    error = errors[0]
    where = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    kind, given, ctx = error.get("type", ""), error.get("input"), error.get("ctx") or {}
    if kind == "json_invalid":
        return "the request is not valid JSON"
    if len(where) > 1 and where[-1].isdigit():  # an item of a list field: "spacing value 2"
        where = [*where[:-1], f"value {int(where[-1]) + 1}"]
    field = " ".join(where) or "the request"
    if kind == "missing":
        return f"{field} is required"
    if kind in ("too_short", "too_long"):
        count = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return f"{field} must have {count} values, got {len(given) if hasattr(given, '__len__') else given!r}"
    must = _MUST_BE.get(kind)
    shown = "nothing" if given is None else repr(given)  # None: an empty field in the page
    if must is not None:
        return f"{field} must be {must}, got {shown}"
    return f"{field}: {error.get('msg', 'not valid')}, got {shown}"


def _record(record) -> dict:
    return dict(record.__dict__)
