"""Files, fine-tuning jobs, models and health, as OpenAI's spec defines them.

Routes that touch only the store are plain functions (FastAPI runs them on its thread pool), so a
slow disk never stalls the event loop that streams chat answers.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response

from ..errors import BackendError, NotFoundError
from ..request_rules import body_doc, job_request, job_schema
from ..services import Services
from .protocol import read_json

router = APIRouter()
MAX_LIMIT = 10_000


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _page(data: list[dict[str, Any]], has_more: bool, *, ids: bool = False) -> dict[str, Any]:
    page: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if ids:
        page["first_id"] = data[0]["id"] if data else None
        page["last_id"] = data[-1]["id"] if data else None
    return page


@router.api_route("/health", methods=["GET", "HEAD"])
def health(request: Request) -> dict[str, Any]:
    """Alive, how many chat requests wait and run, and the live training workers by state (no
    key needed: a count says nothing about anyone's data; ``gpt-finetune workers`` lists them)."""
    services = _services(request)
    chat = services.chat
    workers = {"busy": 0, "idle": 0}
    for w in services.workers.listing():
        workers[w["state"]] += 1
    answer: dict[str, Any] = {
        "status": "ok",
        "queued_requests": chat.pending(),
        "running_requests": chat.running(),
        "workers": workers,
    }
    upstreams = request.app.state.config.upstreams
    if upstreams is not None:  # chat answered elsewhere (serve --chat-upstream)
        answer["chat_upstreams"] = {"configured": len(upstreams.urls), "unreachable": len(upstreams.unreachable())}
    return answer


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus' text format (``server.metrics``); behind the API key when there is one."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, media_type=content_type)


# ---- files ----------------------------------------------------------------------------------
@router.post("/v1/files")
async def create_file(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    services = _services(request)
    limit = request.app.state.config.max_upload_bytes
    row = await run_in_threadpool(
        services.files.create, file.file, file.filename or "upload.jsonl", purpose, max_bytes=limit
    )
    return services.files.to_openai(row)


@router.get("/v1/files")
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = MAX_LIMIT,
    after: str | None = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
) -> dict[str, Any]:
    files = _services(request).files
    rows, more = files.page(purpose=purpose, limit=limit, after=after, order=order)
    return _page([files.to_openai(r) for r in rows], more, ids=True)


@router.get("/v1/files/{file_id}")
def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
    files = _services(request).files
    return files.to_openai(files.retrieve(file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    files = _services(request).files
    row = files.retrieve(file_id)
    files.delete(file_id)
    return {"id": row["id"], "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str) -> FileResponse:
    files = _services(request).files
    row = files.retrieve(file_id)
    path = files.path(file_id)
    if not path.resolve().is_relative_to(_services(request).home.root.resolve()):
        raise NotFoundError(f"No such File object: {file_id}", code="file_not_found")  # never outside the home
    if not path.is_file():  # removed from the data directory behind the store's back
        raise NotFoundError(f"The content of file {file_id} is gone from the server's disk", code="file_not_found")
    return FileResponse(path, media_type="application/octet-stream", filename=row["filename"])


# Extensions: what OpenAI's API has no endpoint for, on paths of their own beside OpenAI's (as
# vLLM adds /tokenize); the dashboard uses these and nothing else, so any client can do what it does.
EXTENSION: list[str | Enum] = ["extensions"]


@router.get("/v1/files/{file_id}/check", tags=EXTENSION)
def check_file(request: Request, file_id: str, model: str | None = None, n_epochs: str | None = None) -> dict[str, Any]:
    """Extension: ``validate``'s findings and ``stats``' figures for an uploaded file (tokens
    as ``model`` counts them, the label distribution, epochs and what OpenAI would have billed)."""
    epochs: int | str | None = n_epochs
    if n_epochs is not None and n_epochs != "auto":
        if not n_epochs.isdigit() or int(n_epochs) < 1:
            raise BackendError("n_epochs must be 'auto' or a whole number of at least 1", param="n_epochs")
        epochs = int(n_epochs)
    return _services(request).files.check(file_id, model=model, n_epochs=epochs)


# ---- fine-tuning jobs ---------------------------------------------------------------------------
@router.post("/v1/fine_tuning/jobs", openapi_extra=body_doc(job_schema()))
async def create_job(request: Request) -> dict[str, Any]:
    services = _services(request)
    kwargs = job_request(await read_json(request)).create_kwargs()
    config = request.app.state.config
    options = config.job_options
    if config.upstreams is not None:  # the model this job makes must load in the chat engines
        from ..contract import CLASSIFICATION_DEFAULTS
        from .upstream import vllm_adapter_problem

        # a classification job may raise the rank the caller left at its default
        rank = options.lora.r if "lora_r" in options.given else max(options.lora.r, CLASSIFICATION_DEFAULTS["lora_r"])
        problem = vllm_adapter_problem(rank, options.model.training_type, config.vllm_max_lora_rank)
        if problem:
            param = "lora_r" if "rank" in problem else "training_type"
            raise BackendError(f"the chat upstream could not serve this job's model: {problem}", param=param)
    return await run_in_threadpool(lambda: services.jobs.create(**kwargs, options=options))


_METADATA = re.compile(r"metadata\[(.+)\]")


@router.get("/v1/fine_tuning/jobs")
def list_jobs(
    request: Request, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20
) -> dict[str, Any]:
    metadata = {m.group(1): v for k, v in request.query_params.items() if (m := _METADATA.fullmatch(k))}
    unknown = set(request.query_params) - {"after", "limit"} - {f"metadata[{k}]" for k in metadata}
    if unknown:
        raise BackendError(f"unknown query parameter: {sorted(unknown)[0]}", param=sorted(unknown)[0])
    data, more = _services(request).jobs.list_jobs(limit=limit, after=after, metadata=metadata or None)
    return _page(data, more)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(request: Request, job_id: str) -> dict[str, Any]:
    return _services(request).jobs.retrieve(job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    return _services(request).jobs.cancel(job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(request: Request, job_id: str) -> dict[str, Any]:
    return _services(request).jobs.pause(job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(request: Request, job_id: str) -> dict[str, Any]:
    return _services(request).jobs.resume(job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(
    request: Request, job_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20
) -> dict[str, Any]:
    data, more = _services(request).jobs.list_events(job_id, limit=limit, after=after)
    return _page(data, more)


@router.get("/v1/fine_tuning/jobs/{job_id}/details", tags=EXTENSION)
def job_details(request: Request, job_id: str) -> dict[str, Any]:
    """Extension: every hyperparameter as resolved, the local options, the label sets of a
    classification job and the memory plan of its worker."""
    return _services(request).jobs.details(job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    request: Request, job_id: str, after: str | None = None, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 10
) -> dict[str, Any]:
    data, more = _services(request).jobs.list_checkpoints(job_id, limit=limit, after=after)
    return _page(data, more, ids=True)


# ---- models ---------------------------------------------------------------------------------
@router.get("/v1/models")
def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _services(request).models.list()}


# model ids hold ':' and, for a base model given as a directory, '/'
@router.get("/v1/models/{model:path}")
def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    return _services(request).models.retrieve(model)


@router.delete("/v1/models/{model:path}")
def delete_model(request: Request, model: str) -> dict[str, Any]:
    _services(request).models.delete(model)
    return {"id": model, "object": "model", "deleted": True}
