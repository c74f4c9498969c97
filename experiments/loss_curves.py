"""Loss curves of training runs, drawn from the `log.csv` that every training run writes into its
folder (maisi2.training: one row per `log_every` steps, the window's mean loss and logged terms).

Usage:
    python experiments/loss_curves.py --work work --out docs/img
        the eight docs/img/loss_*.png of the bundled model's first recipes, from the runs they leave
        under --work: recipes/bundled_model.sh (vae, flow stages 1-3, controlnet) and
        recipes/continue_bundled_model.sh (flow_long stages 2-3, controlnet_long). Those logs are not
        kept in the repository; the command refuses, naming them, when one is missing.
    python experiments/loss_curves.py --run NAME=RUN_DIR[:COLUMN] [--run ...] --out DIR
        any runs: DIR/loss_NAME.png from RUN_DIR/log.csv's COLUMN (default: loss)

Each figure is one line through every logged row, the y axis from the column's smallest to its
largest value (labelled), the x axis from the first to the last logged step.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (figure name, run folder under --work, log.csv column): the runs of recipes/bundled_model.sh and
# recipes/continue_bundled_model.sh. The VAE's curve is its reconstruction L1 (its loss adds the KL
# term); the ControlNets' is their flow loss (their loss adds the contrastive terms).
BUNDLED_RUNS = (
    ("vae", "vae", "recon_l1"),
    ("flow_stage1", "flow/stage_1", "loss"),
    ("flow_stage2", "flow/stage_2", "loss"),
    ("flow_stage3", "flow/stage_3", "loss"),
    ("controlnet", "controlnet", "flow_loss"),
    ("flow_continued_stage2", "flow_long/stage_2", "loss"),
    ("flow_continued_stage3", "flow_long/stage_3", "loss"),
    ("controlnet_continued", "controlnet_long", "flow_loss"),
)


def loss_plot(csv_path: Path, column: str, title: str, size=(480, 240)) -> Image.Image:
    """`column` of a run's log.csv against its `step` column."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0]:
        raise SystemExit(f"{csv_path}: no rows with a {column!r} column")
    steps = np.array([float(r["step"]) for r in rows])
    values = np.array([float(r[column]) for r in rows])
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 20, size[0] - 10, size[1] - 25
    lo, hi = values.min(), values.max()
    xs = left + (steps - steps.min()) / max(np.ptp(steps), 1) * (right - left)
    ys = bottom - (values - lo) / max(hi - lo, 1e-12) * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill="navy", width=2)
    draw.text((left, 3), f"{title}: {column}", fill="black")
    draw.text((2, top), f"{hi:.3g}", fill="black")
    draw.text((2, bottom - 10), f"{lo:.3g}", fill="black")
    draw.text((left, bottom + 5), f"step {int(steps.min())}", fill="black")
    draw.text((right - 70, bottom + 5), f"step {int(steps.max())}", fill="black")
    return img


def parse_run(text: str) -> tuple[str, Path, str]:
    """NAME=RUN_DIR[:COLUMN] -> (NAME, RUN_DIR, COLUMN); the column defaults to the trainer's loss."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR[:COLUMN], got {text!r}")
    folder, _, column = rest.partition(":")
    return name, Path(folder), column or "loss"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("work"),
                    help="the recipes' work folder (used when no --run is given)")
    ap.add_argument("--run", action="append", type=parse_run, default=[], metavar="NAME=RUN_DIR[:COLUMN]",
                    help="draw this run instead of the bundled model's eight (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args(argv)
    runs = args.run or [(name, args.work / folder, column) for name, folder, column in BUNDLED_RUNS]
    missing = [str(folder / "log.csv") for _, folder, _ in runs if not (folder / "log.csv").is_file()]
    if missing:
        sys.exit("missing training logs (run the recipe that makes them first; nothing written):\n  "
                 + "\n  ".join(missing))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, folder, column in runs:
        path = args.out / f"loss_{name}.png"
        loss_plot(folder / "log.csv", column, name).save(path)
        print(f"wrote {path} ({column} of {folder / 'log.csv'})")


if __name__ == "__main__":
    main()
