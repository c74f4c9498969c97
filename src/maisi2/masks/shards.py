"""Dataset-scale generation: a file of requests run in shards across processes, resumable.

    torchrun --nproc_per_node 4 --no-python maisi2 generate --requests requests.jsonl --out-dir CTS/

Each line of ``requests.jsonl`` is one request (JSON): ``{"out": "case_0001.nii.gz", "region": "chest",
"anatomy": "liver,hepatic tumor", "size": [128, 128, 96], "spacing": [3, 3, 3], "tumors": ["lung:1"],
"seed": 7}``, or ``{"mask": "my_mask.nii.gz", "tumors": [...], "out": ...}`` for a given mask. Every
key is optional except that a line needs a region, an anatomy or a mask; "out" defaults to
``line_<n>.nii.gz`` and "seed" to the line number.

Process r of N (torchrun's RANK / WORLD_SIZE; one process without torchrun) runs lines n with
n mod N == r, with the networks loaded once (on CUDA, the GPU of its LOCAL_RANK). A line whose
outputs are all present is skipped (so a killed run resumes where it stopped); a line that fails is
recorded in ``failures.rank<r>.jsonl`` (line, output, error) and the run goes on. At the end each
process writes ``summary.rank<r>.json`` and rank 0 prints and writes ``summary.json`` with the
totals (done / failed / skipped), gathered over gloo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from maisi2.atomic import atomic_output
from maisi2.errors import InvalidInput, MissingInput

__all__ = ["RequestLine", "read_requests", "run_requests", "run_requests_distributed", "shard_of"]

_KEYS = {"out", "region", "anatomy", "size", "spacing", "tumors", "seed", "mask", "num_samples"}


@dataclass(frozen=True)
class RequestLine:
    number: int  # 1-based line number in the file
    row: dict | None  # the parsed request, or None when the line is not a valid request
    error: str = ""

    def out_name(self) -> str:
        return (self.row or {}).get("out") or f"line_{self.number:05d}.nii.gz"


def read_requests(path: str | os.PathLike) -> list[RequestLine]:
    """Every non-empty, non-comment line; a line that is not a JSON object of known keys keeps its error."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInput(f"requests file {path} does not exist")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            row = json.loads(text)
            if not isinstance(row, dict):
                raise InvalidInput("not a JSON object")
            unknown = set(row) - _KEYS
            if unknown:
                raise InvalidInput(f"unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_KEYS))}")
            if not (row.get("region") or row.get("anatomy") or row.get("mask")):
                raise InvalidInput("a request needs a region, an anatomy or a mask")
            lines.append(RequestLine(number, row))
        except ValueError as err:
            lines.append(RequestLine(number, None, f"line {number}: {err}"))
    if not lines:
        raise InvalidInput(f"requests file {path} holds no requests")
    return lines


def shard_of(lines: list[RequestLine], rank: int, world_size: int) -> list[RequestLine]:
    """The lines process `rank` of `world_size` runs: every world_size-th, starting at its rank."""
    return [line for i, line in enumerate(lines) if i % world_size == rank]


def _complete(line: RequestLine, out_dir: Path, options) -> bool:
    from maisi2.generate import OutputPaths
    from maisi2.masks.intent import numbered_outputs

    outs = numbered_outputs(out_dir / line.out_name(), int(line.row.get("num_samples", 1)))
    return all(p.is_file() for out in outs for p in OutputPaths.beside(out, options).all())


def run_requests(requests: str | os.PathLike, out_dir: str | os.PathLike, model=None, options=None,
                 library: str | os.PathLike | None = None, rank: int | None = None,
                 world_size: int | None = None) -> dict:
    """Run this process's shard of `requests` into `out_dir`; returns this shard's summary
    (rank 0 under torchrun: the totals of every shard)."""
    from maisi2 import generate as G
    from maisi2.models import load_model

    options = options or G.GenerateOptions()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    lines = read_requests(requests)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = shard_of(lines, rank, world_size)
    device = options.device
    if world_size > 1 and _cuda(device):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    options = dataclasses.replace(options, device=device, progress=False)
    summary = {"rank": rank, "world_size": world_size, "lines": len(mine), "done": 0, "failed": 0, "skipped": 0}
    todo = [line for line in mine if line.row is None or not _complete(line, out_dir, options)]
    summary["skipped"] = len(mine) - len(todo)
    models = load_model(model, device=device) if any(line.row is not None for line in todo) else None
    failures = out_dir / f"failures.rank{rank}.jsonl"
    for line in todo:
        started = time.perf_counter()
        try:
            if line.row is None:
                raise InvalidInput(line.error)
            _run_line(line, out_dir, models, options, library, Path(requests).expanduser().parent, rank, world_size)
            summary["done"] += 1
        except Exception as err:  # recorded per line; the batch goes on
            summary["failed"] += 1
            with failures.open("a") as f:
                f.write(json.dumps({"line": line.number, "out": line.out_name(), "error": str(err).splitlines()[0]
                                    if str(err) else type(err).__name__,
                                    "seconds": round(time.perf_counter() - started, 2)}) + "\n")
    _write_json(out_dir / f"summary.rank{rank}.json", summary)
    return _gathered(summary, out_dir, world_size)


def run_requests_distributed(requests, out_dir, **kwargs) -> dict:
    """`run_requests` under torchrun: joins the gloo group (CPU objects only: the summaries) when
    WORLD_SIZE > 1, and leaves it at the end."""
    import torch.distributed as dist

    joined = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("gloo")
    try:
        return run_requests(requests, out_dir, **kwargs)
    finally:
        if joined:
            dist.destroy_process_group()


def _cuda(device) -> bool:
    import torch

    return (device in (None, "auto") and torch.cuda.is_available()) or str(device).startswith("cuda")


def _run_line(line: RequestLine, out_dir: Path, models, options, library, base: Path, rank: int, world: int):
    from maisi2 import generate as G
    from maisi2.masks import intent
    from maisi2.masks.select import make_request

    row = line.row
    out = out_dir / line.out_name()
    seed = int(row.get("seed", line.number))
    shard = {"line": line.number, "rank": rank, "world_size": world}
    # An incomplete set (killed while renaming) is replaced; a complete one was skipped earlier.
    line_options = dataclasses.replace(options, seed=seed, overwrite=True,
                                       spacing=tuple(row["spacing"]) if row.get("spacing") else options.spacing)
    tumors = intent.parse_tumor_counts(row.get("tumors", []))
    if row.get("mask"):
        volume, _ = _fitted(base / row["mask"], line_options.spacing)
        edited, changes = intent.mask_with_tumors(volume, tumors, seed=seed)
        line_options = dataclasses.replace(line_options, spacing=None, preview_focus=intent.preview_label(changes),
                                           request={"mask": row["mask"], "shard": shard,
                                                    "tumor_edits": [c.to_dict() for c in changes]})
        return G.generate(edited, out, model=models, options=line_options)
    request = make_request(row.get("region"), row.get("anatomy", ()), row.get("size"), line_options.spacing,
                           divisor=G.network_divisor(models.cfg))
    line_options = dataclasses.replace(line_options, request={"shard": shard})
    return intent.generate_from_intent(request, out, library=library, model=models, options=line_options,
                                       num_samples=int(row.get("num_samples", 1)), tumors=tumors)


def _fitted(path, spacing):
    from maisi2 import volume_io
    from maisi2.masks.select import MaskRequest, fit_mask

    return fit_mask(volume_io.load_label_map(path), MaskRequest(spacing=spacing))


def _gathered(summary: dict, out_dir: Path, world_size: int) -> dict:
    import torch.distributed as dist

    if world_size == 1 or not dist.is_available() or not dist.is_initialized():
        if world_size == 1:
            _write_json(out_dir / "summary.json", {**summary, "shards": [summary]})
        return summary
    shards = [None] * world_size
    dist.all_gather_object(shards, summary)
    total = {k: sum(s[k] for s in shards) for k in ("lines", "done", "failed", "skipped")}
    total = {"world_size": world_size, **total, "shards": shards}
    if summary["rank"] == 0:
        _write_json(out_dir / "summary.json", total)
    return total


def _write_json(path: Path, data: dict) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
