#!/usr/bin/env bash
# The one GPU lease of development session 4 (an NVIDIA H200, 15 minutes in all), as it ran.
# Prepared on the CPU machine in a git-ignored folder .dev/ that travelled with the working tree:
#   .dev/whl/        wheels of monai 1.6.1, nibabel 5.4.2, pydicom 3.0.2 (the GPU image lacks them)
#   .dev/unet.pt     the bundled flow UNet: work/flow_long/stage_3/last.pt with its EMA weights as
#                    state_dict and no trainer state (13.8 MB)
#   .dev/latents.tar.xz  tar cJf of work/latents (the bundled model's latent cache, 20.7 MB)
# Call 1: `TRAIN_S=240 bash .dev/gpu.sh` (this file), 496 s. Call 2, on the still-warm machine,
# resumed the ControlNet to 1,800 steps:
#   maisi2 train-controlnet /tmp/w/latents --out /tmp/w/cn --steps 1800 --resume --unet .dev/unet.pt \
#     --preset small --device cuda --no-progress --batch-size 8 --lr 2e-4 --recipe-set warmup=100 \
#     --recipe-set ema_decay=0.999 --recipe-set num_workers=2 --recipe-set ckpt_every=100 --recipe-set log_every=10
# Results (kept under work/gpu/): bench.jsonl -> docs/performance.md (GPU); controlnet2.pt and
# unet.pt -> docs/results.md (diagnosis). Steps were sized by a 30-step calibration (below).
# One device call: CUDA benchmarks, then ControlNet + flow UNet training on the GPU side by side.
# Env: DEV (cuda), BENCH (1), TRAIN_S (seconds of training), CAL (calibration steps), OUT.
set -u
DEV=${DEV:-cuda}; BENCH=${BENCH:-1}; TRAIN_S=${TRAIN_S:-270}; CAL=${CAL:-30}; MIN=${MIN:-100}; BS=${BS:-8}; FLB=${FLB:-16}; LOGC=${LOGC:-5}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
export PYTHONUNBUFFERED=1
if [ "$DEV" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available())"
M() { python3 -c "import sys; from maisi2.cli import main; sys.argv[0] = 'maisi2'; sys.exit(main())" "$@"; }
W=/tmp/w; mkdir -p $W; tar xJf .dev/latents.tar.xz -C $W || exit 4
el "setup done"

if [ "$BENCH" = 1 ]; then
  B=/tmp/bench; mkdir -p $B
  ( export OMP_NUM_THREADS=8
    timeout 90 python3 benchmarks/generation_speed.py e2e --device $DEV --threads 8 --out $B/gs.jsonl; pkill -9 -f generation_speed.py
    timeout 45 python3 benchmarks/generation_speed.py limit --device $DEV --threads 8 --out $B/gs.jsonl; pkill -9 -f generation_speed.py
    timeout 100 python3 benchmarks/generation_speed.py decode --device $DEV --threads 8 --shape 512 512 128 --out $B/gs.jsonl; pkill -9 -f generation_speed.py
    timeout 45 python3 benchmarks/generation_speed.py decode --device $DEV --threads 8 --shape 512 512 512 --variants ours --out $B/gs.jsonl; pkill -9 -f generation_speed.py
  ) 2>&1 | tee $OUT/bench.txt | cut -c1-400
  cp $B/gs.jsonl $OUT/bench.jsonl 2>/dev/null
  el "benchmarks done"
fi

# Training: ControlNet against the bundled flow UNet (.dev/unet.pt = its EMA weights), and more
# stage-2 flow training from the same weights, concurrently (the networks are small for this GPU).
CN_ARGS=(--unet .dev/unet.pt --preset small --device $DEV --no-progress --batch-size $BS --lr 2e-4
         --recipe-set warmup=100 --recipe-set ema_decay=0.999 --recipe-set num_workers=2)
FL_ARGS=(--stage 2 --init .dev/unet.pt --preset small --device $DEV --no-progress
         --recipe-set stage2.lr=2e-4 --recipe-set stage2.warmup=100 --recipe-set stage2.max_batch_size=$FLB
         --recipe-set ema_decay=0.999 --recipe-set num_workers=2)
export OMP_NUM_THREADS=4
M train-controlnet $W/latents --out $W/cal_cn --steps $CAL --recipe-set ckpt_every=1000 --recipe-set log_every=$LOGC "${CN_ARGS[@]}" > $W/cal_cn.txt 2>&1 &
M train-flow $W/latents --out $W/cal_fl --recipe-set stage2.steps=$CAL --recipe-set ckpt_every=1000 --recipe-set log_every=$LOGC "${FL_ARGS[@]}" > $W/cal_fl.txt 2>&1 &
wait
tail -n 3 $W/cal_cn.txt $W/cal_fl.txt
rate() {  # seconds per step between the first and last log rows
  python3 -c "
import csv,sys
r=list(csv.DictReader(open(sys.argv[1])))
print((float(r[-1]['seconds'])-float(r[0]['seconds']))/(int(r[-1]['step'])-int(r[0]['step'])))" "$1"; }
CN_S=$(rate $W/cal_cn/log.csv) || exit 5
FL_S=$(rate $W/cal_fl/stage_2/log.csv) || exit 5
# 0.9: leave time for checkpoints and start-up
CN_N=$(python3 -c "print(max($MIN, int(0.9 * $TRAIN_S / $CN_S) // 50 * 50))")
FL_N=$(python3 -c "print(max($MIN, int(0.9 * $TRAIN_S / $FL_S) // 50 * 50))")
el "calibration: controlnet $CN_S s/step -> $CN_N steps; flow $FL_S s/step -> $FL_N steps"

M train-controlnet $W/latents --out $W/cn --steps $CN_N --recipe-set ckpt_every=250 --recipe-set log_every=10 "${CN_ARGS[@]}" > $W/cn.txt 2>&1 &
M train-flow $W/latents --out $W/fl --recipe-set stage2.steps=$FL_N --recipe-set ckpt_every=250 --recipe-set log_every=10 "${FL_ARGS[@]}" > $W/fl.txt 2>&1 &
wait
tail -n 3 $W/cn.txt $W/fl.txt
el "training done"

# Back: weights without optimizer state (each file under 16 MB), and the logs.
python3 - "$W" "$OUT" <<'EOF'
import sys, shutil, torch
w, out = sys.argv[1:]
for src, dst, ema_only in [(f"{w}/cn/last.pt", f"{out}/controlnet.pt", False),
                           (f"{w}/fl/stage_2/last.pt", f"{out}/unet.pt", True)]:
    try:
        d = torch.load(src, weights_only=True)
    except Exception as e:
        print("no", src, e); continue
    d["extra"] = {k: v for k, v in d["extra"].items() if k != "trainer"}
    if ema_only and d.get("ema_state_dict") is not None:
        d["state_dict"], d["ema_state_dict"] = d["ema_state_dict"], None
    torch.save(d, dst)
    print(dst, d["step"])
for src, dst in [(f"{w}/cn/log.csv", "cn_log.csv"), (f"{w}/fl/stage_2/log.csv", "fl_log.csv")]:
    try:
        shutil.copy(src, f"{out}/{dst}")
    except OSError as e:
        print(e)
EOF
cat $W/cal_cn.txt $W/cal_fl.txt $W/cn.txt $W/fl.txt > $OUT/train.txt
ls -la $OUT; el "all done"
