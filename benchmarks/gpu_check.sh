#!/usr/bin/env bash
# The GPU figures the README still lacks, in one command on a lent device machine. Estimated on an H200 with
# 16 cores at about 7.5 minutes in all, from what each part's work took in the 2026-11-30 logs
# (../shared/gpu/2026-11-30/; the script prints each part's real time, "=== part: exit N, S s"):
#   set-up      ~20 s   CIFAR-10 rebuilt from the JPEG archive (once)
#   tests       ~45 s   the CUDA tests: captured steps (test_step_module), host copies (test_checkpoint_module),
#                       the GPU JPEG decode against the CPU and Pillow (test_image_module)
#   throughput  ~75 s   default CNN at batch 128: bare, graphed, pipeline and tutorial paths; then the pipeline
#                       with each recipe feature (AUTO_AUGMENT, RANDOM_ERASING, MIXUP/CUTMIX, EMA, accumulation,
#                       clipping) against the plain pipeline and the graphed bare step
#   default     ~45 s   a cold `python main.py` (40 epochs) and its time account (everything outside the epochs),
#                       and three cold `python -c "import torch, torchvision"`, the floor of any start-up
#   recipe      ~45 s   the same 40 epochs with TrivialAugment and an EMA of the weights (0.999): its test
#                       accuracy against the default's (86.7% on 2026-11-30; the goal is 1 point more)
#   tta         ~90 s   fast preset 3 seeds, airbench94 3 runs, and 2 cold runs of each
#   folder      ~2 min  20,000 JPEGs written, decoded into the cache (on the GPU now), streamed, resident and the
#                       reference; a cold `python main.py` on the cached folder to its first epoch
#   nccl        ~40 s   with two GPUs or more: `torchrun --nproc_per_node=2` on 5,000 images for 2 epochs over NCCL
#                       (the processes must agree); with one, skipped with a note (no time)
#   profile     ~45 s   (not run by default) the fast preset's step: kernel table and host synchronisations
# Give parts (two calls) if the device time is short. The machine has no ../shared: carry .device/, made here with
#   mkdir -p .device/tools .device/data && cp ../shared/tools/cifar10_from_jpeg.py .device/tools/ &&
#   cp -r ../shared/data/jpeg .device/data/
#   python3 -m pip wheel --no-deps -w .device/wheels airbench==0.1.8    # optional: airbench94's side (a wheel)
# (.device/ is git-ignored), then run `bash benchmarks/gpu_check.sh [tests] [throughput] [default] [recipe] [tta]
# [folder] [nccl] [profile]`.
# Everything printed also goes to $OUT/gpu_check.log, and the benchmarks' JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.device/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests throughput default recipe tta folder nccl}

checks() {
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

if [ -d .device/wheels ]; then  # airbench is pure Python
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl && export PYTHONPATH=/tmp/site
fi
DATA=.device/cifar
if [ ! -d $DATA/cifar-10-batches-py ]; then
    python3 .device/tools/cifar10_from_jpeg.py $DATA || return 1  # reads .device/data/jpeg, beside its folder
fi

for part in $parts; do
    echo "=== $part"
    start=$SECONDS
    case $part in
        tests) python3 -m pytest -q -p no:cacheprovider tests/test_step_module.py tests/test_checkpoint_module.py \
                   tests/test_image_module.py -k "captured or cuda" ;;
        profile) python3 benchmarks/profile_step.py --preset fast --steps 20 --fit --epochs 2 --data-dir $DATA \
                     --output "$OUT" ;;
        throughput) python3 benchmarks/throughput.py --data-dir $DATA --batch-size 128 --recipe --output "$OUT" ;;
        default) for i in 1 2 3; do TIMEFORMAT="import torch, torchvision: %R s"; time python3 -c "import torch, torchvision"; done
                 rm -rf /tmp/default_run
                 TIMEFORMAT="python main.py, start to exit: %R s"
                 time python3 main.py --data-dir $DATA --output-dir /tmp/default_run --ask-epoch none \
                     | grep -E "^(Time|Test accuracy|Training ended)"
                 cp /tmp/default_run/best_model.json "$OUT/default_best_model.json" ;;
        recipe) rm -rf /tmp/recipe_run
                TIMEFORMAT="python main.py --auto-augment trivialaugment --ema-decay 0.999, start to exit: %R s"
                time python3 main.py --data-dir $DATA --output-dir /tmp/recipe_run --ask-epoch none \
                    --auto-augment trivialaugment --ema-decay 0.999 | grep -E "^(Time|Test accuracy|Training ended)"
                cp /tmp/recipe_run/best_model.json "$OUT/recipe_best_model.json" ;;
        tta) python3 benchmarks/time_to_accuracy.py --data-dir $DATA --runs 3 --airbench-runs 3 --output "$OUT" ;;
        folder) python3 benchmarks/folder_throughput.py --data-dir $DATA --output "$OUT" \
                    --work-dir /tmp/folder_throughput ;;
        nccl) gpus=$(nvidia-smi --list-gpus | wc -l)
              if [ "$gpus" -lt 2 ]; then
                  echo "nccl: skipped: this machine has $gpus GPU; the two-process NCCL check needs two"
              else
                  rm -rf /tmp/nccl_run
                  timeout 300 torchrun --standalone --nproc_per_node=2 main.py --data-dir $DATA \
                      --output-dir /tmp/nccl_run --train-subset 5000 --epochs 2 --ask-epoch none \
                      | grep -E "^(Time|Test accuracy|LR decisions|Training ended)"
              fi ;;
        *) echo "unknown part $part (tests, throughput, default, recipe, tta, folder, nccl, profile)" ;;
    esac
    echo "=== $part: exit $?, $((SECONDS - start)) s"
done
}
checks 2>&1 | tee -a "$OUT/gpu_check.log"
