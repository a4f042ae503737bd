#!/usr/bin/env bash
# The GPU leg of issue 18: train the one-step design (configs/one_step/gpu_small.yaml) on one GPU for 8 minutes of
# training clock (9 in all with the start), warm-started from the last weights, from a machine with torch,
# torchmetrics, pillow and pyyaml (no Lightning, Hydra or open-clip needed: a plain-PyTorch loop).
#
#   here, once per leg:  bash benchmarks/gpu_train_leg.sh pack LAST_WEIGHTS.safetensors
#       fills .gpu_leg/ (git-ignored): TAESD SD encoder/decoder, the LPIPS AlexNet backbone (fp16), the warm-start
#       weights and as many BSDS500 training images as fit under the 64 MiB that travel with the repo (~160 while
#       the bundled 35 MB model is tracked; crops cut and TAESD-encoded on the GPU, every crop new)
#   on the GPU:  run(command="bash benchmarks/gpu_train_leg.sh run", carry=[".gpu_leg"], timeout_s=600)
#       $OUT/model.safetensors: the EMA weights after the leg (7.8 MB, fp16, one-step sampling recommended),
#       $OUT/train.log: losses and samples/s every 50 steps. Pack it as the next leg's LAST_WEIGHTS.
#   CPU smoke test:  bash benchmarks/gpu_train_leg.sh run --device cpu --minutes 0.2 --batch-size 2 --pool 8 --threads 1
# Per sample: 38 GFLOP to encode a 256-px crop and its LR (once, into a pool of 65,536 crops: ~2.5 PFLOP, seconds on
# an H200), 23 GFLOP per training step (U-Net 3.9 M fwd+bwd, TAESD decode of a 128-px window fwd+bwd, LPIPS):
# 5,000 samples/s needs ~117 TFLOP/s of bf16 convolution (torch.utils.flop_counter on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
leg=.gpu_leg
mode=${1:?usage: gpu_train_leg.sh pack [WEIGHTS] | run [equal_compute.py train options]}
shift
case $mode in
pack)
  grep -qsx '/.gpu_leg/' .git/info/exclude || echo '/.gpu_leg/' >> .git/info/exclude
  rm -rf $leg && mkdir -p $leg/weights/taesd $leg/weights/lpips $leg/images
  cp "$LATENTUP_WEIGHTS"/taesd/taesd_{encoder,decoder}.safetensors $leg/weights/taesd/
  if [ -n "${1:-}" ]; then cp "$1" $leg/init.safetensors; fi
  # the LPIPS backbone as fp16 (4.8 MB), then BSDS500 images by name while the tree that travels stays < 64 MiB
  python3 - "$LATENTUP_WEIGHTS/lpips/alexnet_features.safetensors" "$LATENTUP_DATA/train/BSDS500" <<'PY'
import shutil, subprocess, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
save_file({k: v.half() for k, v in load_file(sys.argv[1]).items()}, ".gpu_leg/weights/lpips/alexnet_features.safetensors")
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True,
                        check=True).stdout.decode().split("\0")
used = sum(Path(f).stat().st_size for f in listed if f and Path(f).is_file())
used += sum(f.stat().st_size for f in Path(".gpu_leg").rglob("*") if f.is_file())
room, taken = 64 * 2**20 - 2 * 2**20 - used, 0
for image in sorted(Path(sys.argv[2]).rglob("*.jpg")):
    if image.stat().st_size > room:
        break
    room -= image.stat().st_size
    shutil.copy(image, Path(".gpu_leg/images") / f"{image.parent.name}_{image.name}")
    taken += 1
print(f"{taken} images packed; {room / 2**20:.1f} MiB left under the 64 MiB that travels (2 MiB kept spare)")
PY
  du -sh $leg
  ;;
run)
  export LATENTUP_WEIGHTS=$PWD/$leg/weights HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  out=${OUT:-/tmp/gpu_leg_out}
  run=$(mktemp -d)
  mkdir -p "$out"
  init=()
  if [ -f $leg/init.safetensors ]; then init=(--init $leg/init.safetensors); fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  python3 benchmarks/equal_compute.py train --recipe configs/one_step/gpu_small.yaml --run "$run" \
      --images $leg/images --pool 65536 --clock wall --hours --minutes 8 --device cuda --threads 8 "${init[@]}" "$@" \
      2>&1 | tee "$out/train.log"
  cp "$run"/at_*s.safetensors "$out/model.safetensors"
  ls -l "$out"
  ;;
*)
  echo "error: unknown mode $mode: use pack or run" >&2; exit 2
  ;;
esac
