"""experiments/loss_curves.py: the command that draws docs/img/loss_*.png from the training runs' log.csv."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loss_curves import BUNDLED_RUNS, main

REPO = Path(__file__).resolve().parents[1]
HEADER = "step,lr,loss,skipped,seconds,flow_loss,recon_l1\n"


def write_log(folder: Path, losses) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{10 * (k + 1)},0.001,{v},0,{k},{v},{v}\n" for k, v in enumerate(losses))
    (folder / "log.csv").write_text(HEADER + rows)


def test_the_bundled_set_writes_exactly_the_committed_loss_figures(tmp_path):
    for _, folder, _ in BUNDLED_RUNS:
        write_log(tmp_path / "work" / folder, [0.5, 0.4, 0.45, 0.3])
    main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "img")])
    written = sorted(p.name for p in (tmp_path / "img").glob("*.png"))
    assert written == sorted(p.name for p in (REPO / "docs/img").glob("loss_*.png"))
    assert all(Image.open(tmp_path / "img" / name).size == (480, 240) for name in written)


def test_a_missing_log_is_named_and_nothing_is_written(tmp_path):
    for _, folder, _ in BUNDLED_RUNS[:-1]:
        write_log(tmp_path / "work" / folder, [0.5, 0.4])
    with pytest.raises(SystemExit, match="controlnet_long/log.csv"):
        main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "img")])
    assert not (tmp_path / "img").exists()


def test_the_curve_spans_the_plot_from_the_largest_to_the_smallest_value(tmp_path):
    write_log(tmp_path / "run", [0.9, 0.2, 0.6])
    main(["--run", f"mine={tmp_path / 'run'}:flow_loss", "--out", str(tmp_path)])
    pixels = np.asarray(Image.open(tmp_path / "loss_mine.png").convert("RGB")).astype(int)
    navy = (pixels[..., 0] < 40) & (pixels[..., 1] < 40) & (pixels[..., 2] > 90)
    rows, cols = np.nonzero(navy)
    top, bottom, left, right = 20, 240 - 25, 50, 480 - 10  # the plot's frame
    assert rows.min() <= top + 1 and rows.max() >= bottom - 1  # 0.9 at the top edge, 0.2 at the bottom
    assert cols.min() <= left + 1 and cols.max() >= right - 1  # steps 10 to 30 across the width
    # the first point (step 10, 0.9) is at the top left; the smallest value (step 20) in the middle
    assert navy[top - 1:top + 2, left - 1:left + 3].any()
    assert navy[bottom - 2:bottom + 2, (left + right) // 2 - 2:(left + right) // 2 + 3].any()
