#!/usr/bin/env bash
# The bundled model's VAE decoder, fine-tuned (development session 14). Runs after
# recipes/real_mask_controlnet.sh, whose phantoms, real DICOM scan at 3 mm and latent cache it reuses
# from $W; the UNet and ControlNet are read from the shipped model folder. Resumable. The result is
# exported to $W/model_decoder.
#
# Why: the shipped VAE (800 steps on 32^3 crops, 2 of its 92 scans real) decoded real anatomy too
# bright: its reconstruction of the held-out scan example_ct_sm put liver / spleen / pancreas /
# kidney at 122 / 111 / 90 / 99 HU where the scan has 46 / 35 / -7 / 14. Only the decoder is
# trained (on the frozen encoder's posterior means), so the latent space, the latent cache and
# the flow UNet and ControlNet trained on it all stay valid. Data: the 90 phantoms plus the real
# DICOM scan listed 10 times; neither example_ct_sm nor example_ct (the held-out map's patient) is in it.
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-work/b2}
SHIPPED=${SHIPPED:-src/maisi2/resources/models/default}
D=$W/decoder
mkdir -p "$D/init"
# The VAE it starts from: the shipped one before this fine-tune (git commit 6203692), so that a rerun
# starts where this one did, whatever the shipped folder holds by then.
for f in model.json vae.safetensors unet.safetensors controlnet.safetensors; do  # a model folder holds all three
    [ -f "$D/init/$f" ] || git show "6203692:src/maisi2/resources/models/default/$f" > "$D/init/$f"
done
python - "$W" "$D" <<'PY'
import sys
from pathlib import Path
from maisi2.data import DataItem, read_datalist, write_datalist
w, d = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
real = DataItem(w / "real/dicom_ct_3mm.nii.gz", w / "real/dicom_label_3mm.nii.gz", source="totalseg")
write_datalist(d / "train.jsonl", read_datalist(w / "phantoms/datalist.jsonl") + [real] * 10, overwrite=True)
PY
r() { [ -f "$1/last.pt" ] && echo --resume || true; }
maisi2 train-vae "$D/train.jsonl" --out "$D/run" --preset small --init "$D/init" --decoder-only \
    --patch 64 64 64 --steps 600 --lr 1e-4 --warmup 20 --ema-decay 0.99 --ckpt-every 50 --no-progress $(r "$D/run")
python - "$W" "$D" "$SHIPPED" <<'PY'
import json, sys
from pathlib import Path
from maisi2.export import export_model
w, d, shipped = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
meta = json.loads(Path(shipped, "model.json").read_text())["metadata"]
notes = {k: meta[k] for k in ("trained_steps", "weights", "trained_steps_note", "held_out") if k in meta}
notes["trained_steps"] = dict(notes.get("trained_steps", {}), vae=800 + 600)
notes["vae_note"] = ("encoder: recipes/bundled_model.sh (800 steps); decoder: 600 more steps, decoder only, on the "
                     "phantoms and the real DICOM scan (recipes/decoder_finetune.sh)")
export_model(d / "run/vae.pt", shipped, shipped, w / "model_decoder", cache=w / "latents", notes=notes, overwrite=True)
print(f"wrote {w / 'model_decoder'}")
PY
# Then: python experiments/real_masks.py --model shipped=$SHIPPED --model new=$W/model_decoder --seeds 5,
# and copy $W/model_decoder over $SHIPPED when it follows the held-out map better.
