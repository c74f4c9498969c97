"""Sharded, resumable generation from a requests file (maisi2.masks.shards) under torchrun with 2 gloo
processes: every line runs exactly once, on the rank it belongs to; a killed run resumes; failures are
recorded per line without stopping the batch."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maisi2 import models, nets, volume_io
from maisi2 import generate as G
from maisi2.config import get_config
from maisi2.masks import shards

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_FOV = {"fov_mm": {"min": [128.0, 128.0, 128.0], "max": [320.0, 320.0, 320.0]}}
GOOD = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = models.save_model_folder(root / "model", cfg, nets.build_vae(cfg), nets.build_unet(cfg),
                                     nets.build_controlnet(cfg), 0.8, TINY_FOV)
    (root / "lib").mkdir()
    volume_io.save_label_map(root / "lib" / "torso.nii.gz", G.phantom_mask((32, 32, 24), (8.0, 8.0, 8.0), seed=1))
    rows = [json.dumps({"region": "abdomen", "anatomy": "liver", "size": [32, 32, 32], "spacing": [8, 8, 8],
                        "seed": i, "out": f"case_{i}.nii.gz"}) for i in range(GOOD - 1)]
    rows.insert(2, json.dumps({"region": "hed", "out": "bad_region.nii.gz"}))  # fails when run
    rows.insert(4, "{not json")  # fails when read
    rows.append(json.dumps({"mask": "lib/torso.nii.gz", "tumors": ["hepatic"], "out": "given_mask.nii.gz"}))
    (root / "requests.jsonl").write_text("\n".join(rows) + "\n")
    return root, model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(root, model) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "maisi2", "generate", "--requests", str(root / "requests.jsonl"), "--out-dir", str(root / "out"),
           "--model", str(model), "--library", str(root / "lib"), "--steps", "2", "--no-progress", "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_read_and_shard_requests(setup):
    root, _ = setup
    lines = shards.read_requests(root / "requests.jsonl")
    assert len(lines) == GOOD + 2 and [line.number for line in lines if line.row is None] == [5]
    parts = [shards.shard_of(lines, r, 2) for r in range(2)]
    numbers = sorted(line.number for part in parts for line in part)
    assert numbers == [line.number for line in lines]  # every line in exactly one shard


@pytest.mark.slow
def test_two_gloo_processes_split_the_requests_once_and_resume_after_a_kill(setup):
    root, model = setup
    out = root / "out"
    first = _torchrun(root, model)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not list(out.glob("*_report.json")):
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the whole process group: torchrun and both ranks
    first.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*_report.json")}
    assert finished, "no request finished before the kill"

    second = _torchrun(root, model)
    log, _ = second.communicate(timeout=600)
    assert second.returncode == 1, log  # two lines fail by design
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lines"] == GOOD + 2 and summary["failed"] == 2
    assert summary["skipped"] >= len(finished) and summary["done"] + summary["skipped"] == GOOD
    assert f"{GOOD + 2} requests: {summary['done']} done, 2 failed, {summary['skipped']} skipped" in log
    for path, mtime in finished.items():  # finished before the kill: not run again
        assert path.stat().st_mtime_ns == mtime
    reports = sorted(out.glob("*_report.json"))
    assert len(reports) == GOOD
    lines = shards.read_requests(root / "requests.jsonl")
    rank_of = {line.out_name(): i % 2 for i, line in enumerate(lines)}
    for path in reports:
        report = json.loads(path.read_text())
        name = path.name.replace("_report.json", ".nii.gz")
        assert report["request"]["shard"]["rank"] == rank_of[name]
    failures = [json.loads(t) for f in out.glob("failures.rank*.jsonl") for t in f.read_text().splitlines()]
    latest = {f["line"]: f["error"] for f in failures}
    assert "unknown body region 'hed'" in latest[3] and "line 5" in latest[5]
    given = json.loads((out / "given_mask_report.json").read_text())
    assert given["request"]["tumor_edits"][0]["parent_organ"] == "liver"
