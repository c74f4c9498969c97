#!/usr/bin/env bash
# Reproduce the bundled default model (preset "small") on 2 CPU cores, stage by stage.
# Every stage checkpoints and resumes: rerun the script after an interruption and it continues.
# Outputs go under work/ (git-ignored); the exported model is copied into the package at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. recipes/phantoms.sh
W=${W:-work}
SHARED=${SHARED:-../shared/data/totalsegmentator}
mkdir -p "$W/real"

# 1. Data: 90 phantoms on three grids (three size buckets, three spacings) + the real scans.
bundled_phantoms "$W/phantoms"
[ -f "$W/real/example_label.nii.gz" ] || maisi2 labels import-totalseg "$SHARED/example_seg.nii.gz" \
    --ct "$SHARED/example_ct_sm.nii.gz" --out "$W/real/example_label.nii.gz"
python - "$W" "$SHARED" <<'PY'
import sys
from pathlib import Path
from maisi2.data import DataItem, read_datalist, write_datalist
w, shared = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
real = [DataItem(shared / "example_ct_sm.nii.gz", (w / "real/example_label.nii.gz").resolve(), source="totalseg"),
        DataItem(shared / "example_ct.nii.gz", None, source="totalseg", fold=1)]
write_datalist(w / "all.jsonl", read_datalist(w / "phantoms/datalist.jsonl") + real, overwrite=True)
PY

# 2. VAE on random 32^3 crops.
resume() { [ -f "$1/last.pt" ] && echo --resume || true; }
maisi2 train-vae "$W/all.jsonl" --out "$W/vae" --preset small --steps 800 --patch 32 32 32 \
    --batch-size 2 --lr 3e-4 --warmup 20 --ema-decay 0.99 --ckpt-every 50 --no-progress $(resume "$W/vae")

# 3. Latent cache (posterior means) and scale factor.
maisi2 encode "$W/all.jsonl" --vae "$W/vae/vae.pt" --out "$W/latents" --no-progress

# 4. Flow UNet, three stages: low-res pre-training (16^3 latents, batch 8), size-bucketed full
#    resolution (one bucket per batch), balanced batch-1 fine-tuning (phantom vs real sources).
maisi2 train-flow "$W/latents" --out "$W/flow" --preset small --no-progress $(resume "$W/flow/stage_1") \
    --recipe-set stage1.steps=400 --recipe-set stage1.lr=5e-4 --recipe-set stage1.warmup=20 \
    --recipe-set stage2.steps=600 --recipe-set stage2.lr=3e-4 --recipe-set stage2.voxels_per_batch=65536 \
    --recipe-set stage3.steps=200 --recipe-set stage3.lr=1e-4 \
    --recipe-set ema_decay=0.99 --recipe-set ckpt_every=50

# 5. ControlNet with the region-specific contrastive loss (lambda 0.01, then 0.001).
maisi2 train-controlnet "$W/latents" --unet "$W/flow/stage_3/last.pt" --out "$W/controlnet" --preset small \
    --steps 200 --lr 1e-4 --no-progress --recipe-set ema_decay=0.99 --recipe-set ckpt_every=50 \
    $(resume "$W/controlnet")

# 6. The model folder, shipped inside the package.
maisi2 export-model --vae "$W/vae/vae.pt" --unet "$W/flow/stage_3/last.pt" \
    --controlnet "$W/controlnet/last.pt" --cache "$W/latents" --out src/maisi2/resources/models/default --overwrite
# Its loss curves (with recipes/continue_bundled_model.sh's runs: docs/img/loss_*.png):
# python experiments/loss_curves.py --work "$W" --out docs/img
