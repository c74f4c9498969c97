#!/usr/bin/env bash
# Continuation of recipes/bundled_model.sh (started in development session 2, not finished yet):
# more flow steps from the shipped stage-3 UNet, then a longer ControlNet, exported to work/model_long
# for comparison before it replaces src/maisi2/resources/models/default. Resumable like the recipe.
# History: stage 2 was launched with 2000 steps, shortened at step 400 to 1000 and at step 450 to
# 1500 (each restart resumes; the cosine learning rate follows the step count in force), so a clean
# rerun with 1500 from the start follows a slightly different learning-rate curve before step 450.
# The ControlNet (session 3) was launched with 600 steps and shortened to 450 at step 50 (CPU time).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-work}
r() { [ -f "$1/last.pt" ] && echo --resume || true; }
maisi2 train-flow $W/latents --out $W/flow_long --stage 2 --init $W/flow/stage_3/last.pt --preset small --no-progress $(r $W/flow_long/stage_2) \
  --recipe-set stage2.steps=1500 --recipe-set stage2.lr=3e-4 --recipe-set stage2.warmup=20 --recipe-set stage2.voxels_per_batch=65536 \
  --recipe-set ema_decay=0.995 --recipe-set ckpt_every=50
maisi2 train-flow $W/latents --out $W/flow_long --stage 3 --preset small --no-progress $(r $W/flow_long/stage_3) \
  --recipe-set stage3.steps=150 --recipe-set stage3.lr=5e-5 --recipe-set ema_decay=0.995 --recipe-set ckpt_every=50
maisi2 train-controlnet $W/latents --unet $W/flow_long/stage_3/last.pt --out $W/controlnet_long --preset small \
  --steps 450 --lr 3e-4 --no-progress --recipe-set warmup=20 --recipe-set ema_decay=0.99 --recipe-set ckpt_every=25 \
  $(r $W/controlnet_long)
maisi2 export-model --vae $W/vae/vae.pt --unet $W/flow_long/stage_3/last.pt --controlnet $W/controlnet_long/last.pt \
  --cache $W/latents --out $W/model_long --overwrite
# Then: python experiments/previews.py --work $W --model $W/model_long --out docs/img and
# python experiments/loss_curves.py --work $W --out docs/img (the loss_*.png curves), compare with the
# shipped model, and copy $W/model_long over src/maisi2/resources/models/default if it is better.
