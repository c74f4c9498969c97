"""What a volume size costs on this machine: time and peak memory of mask -> CT, per edge length.

Two models:
- ``bundled``: the default model, through the real command, ``maisi2 generate --phantom --shape N N N
  --phantom-spacing 4 4 4 --force`` (30 steps, no quality-check retries; ``--force`` because from
  256^3 on such a field of view is outside what the model was trained on, which changes nothing of
  the cost), one fresh process per size; its
  wall time, CPU time and peak resident memory come from the operating system (``os.wait4``), the
  split into sampling and decoding from the report's ``timings_s``.
- ``released``: MAISI-v2's architecture (random weights), through ``benchmarks/generation_speed.py
  e2e --variants ours`` (what ``generate`` runs). Its 30-step sampling takes many minutes beyond
  128^3 on 2 cores, so it runs ``--released-steps`` steps and the table gives the 30-step total
  *estimated* as measured total + (30 - k) x the median step, its CPU time as the sampling's scaled
  to 30 steps plus the decode's (steps cost the same each; the peak does not grow with the step
  count). The column says which rows are estimated. These times start after the networks are built
  (no Python start-up, no weight loading); the bundled rows time the whole command.

    python benchmarks/size_cost.py                          # 64, 128, 256 (2 cores: ~15 min)
    python benchmarks/size_cost.py --sizes 64 128 --released-steps 30

Rows are appended to ``--out`` (JSON lines) and a Markdown table is printed with the CPU named.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bundled(size: int, steps: int, threads: int) -> dict:
    """One `maisi2 generate` process on a phantom of size^3 at 4 mm with the bundled model."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ct.nii.gz"
        cmd = [sys.executable, "-m", "maisi2", "generate", "--phantom", "--shape", *[str(size)] * 3,
               "--phantom-spacing", "4", "4", "4", "--steps", str(steps), "--seed", "0", "--qc-retries", "0",
               "--no-progress", "--force", "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            return {"error": output[-2000:], "wall_s": wall}
        report = json.loads((Path(tmp) / "ct_report.json").read_text())
    timings = report.get("timings_s", {})
    return {"total_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
            "timings_s": timings, "estimated": False}


def released(size: int, steps: int, threads: int, scratch: Path) -> dict:
    """generation_speed.py e2e (variant ours) at size^3 with `steps` steps, scaled to 30 steps."""
    out = scratch / f"released_{size}.jsonl"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "generation_speed.py"), "e2e", "--variants", "ours", "--size", str(size),
           "--steps", str(steps), "--threads", str(threads), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if done.returncode != 0 or not rows or "error" in rows[-1]:
        return {"error": (rows[-1].get("stderr") if rows else None) or done.stderr[-2000:]}
    row = rows[-1]
    total30 = row["total_s"] + (30 - steps) * row["step_median_s"]
    return {"total_s": total30, "measured_total_s": row["total_s"], "steps_run": steps,
            "step_median_s": row["step_median_s"], "decode_s": row["decode_s"],
            "cpu_s": row["cpu_sampling_s"] * 30 / steps + row["cpu_decode_s"], "peak_mib": row.get("peak_rss_mib"),
            "estimated": steps != 30}


MODEL_NAMES = {"bundled": "bundled (`small`)", "released": "released architecture"}


def table(rows: list[dict]) -> str:
    """The Markdown table of docs/performance.md: one row per model and size, models in turn."""
    def peak(r):
        if not r.get("peak_mib"):
            return "-"
        gib = r["peak_mib"] / 1024
        return f"{gib:.2f} GiB" if gib < 10 else f"{gib:.1f} GiB"

    lines = ["| model | volume | time s | CPU s | peak memory | how |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in sorted(rows, key=lambda r: (list(MODEL_NAMES).index(r["model"]), r["size"])):
        name = MODEL_NAMES[r["model"]]
        if "error" in r:
            lines.append(f"| {name} | {r['size']}^3 | failed | | | {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        how = (f"estimated: {r['steps_run']} steps run, median step {r['step_median_s']:.2f} s, decode "
               f"{r['decode_s']:.1f} s" if r["estimated"] else "measured, the whole `maisi2 generate` command")
        lines.append(f"| {name} | {r['size']}^3 | {r['total_s']:.1f} | {r['cpu_s']:.1f} | {peak(r)} | {how} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="edge lengths (multiples of 32)")
    ap.add_argument("--models", nargs="+", default=["bundled", "released"], choices=["bundled", "released"])
    ap.add_argument("--released-steps", type=int, default=5, help="steps run for the released architecture")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("work/bench/size_cost.jsonl"))
    args = ap.parse_args()
    if any(s <= 0 or s % 32 for s in args.sizes) or not 1 <= args.released_steps <= 30 or args.threads < 1:
        ap.error("sizes must be positive multiples of 32, --released-steps 1..30, --threads >= 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from maisi2.compute import CpuCapabilities

    rows = []
    for size in args.sizes:
        for model in args.models:
            row = (bundled(size, 30, args.threads) if model == "bundled"
                   else released(size, args.released_steps, args.threads, args.out.parent))
            row.update(model=model, size=size, threads=args.threads, when=time.strftime("%Y-%m-%d %H:%M:%S"),
                       load_average=os.getloadavg()[0])
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n" + table(rows))
    print(f"\nCPU: {CpuCapabilities.detect().describe()}; {args.threads} threads; "
          f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
