#!/usr/bin/env bash
# The GPU figures the README still lacks, in one command on a lent device machine. Estimated on an H200 with
# 16 cores at about 7.5 minutes in all, from what each part's work took in the 2026-11-30 logs
# (../shared/gpu/2026-11-30/; the script prints each part's real time, "=== part: exit N, S s"):
#   set-up      ~20 s   CIFAR-10 rebuilt from the JPEG archive (once)
#   tests       ~45 s   the CUDA tests: captured steps (test_step_module), host copies (test_checkpoint_module)
#   profile     ~45 s   the fast preset's step: kernel table and host synchronisations of 20 warm steps; then
#                       those of a whole 2-epoch fast-preset run, after one uncounted run
#   throughput  ~45 s   default CNN at batch 128: bare, graphed, pipeline and tutorial paths
#   default     ~45 s   a cold `python main.py` (40 epochs) and its time account (everything outside the epochs),
#                       and three cold `python -c "import torch, torchvision"`, the floor of any start-up
#   tta         ~2 min  fast preset 5 seeds, airbench94 5 runs, and 2 cold runs of each
#   folder      ~2 min  20,000 JPEGs written, decoded into the cache, streamed, resident and the reference
# Give parts (two calls) if the device time is short. The machine has no ../shared: carry .device/, made here with
#   mkdir -p .device/tools .device/data && cp ../shared/tools/cifar10_from_jpeg.py .device/tools/ &&
#   cp -r ../shared/data/jpeg .device/data/
#   python3 -m pip wheel --no-deps -w .device/wheels airbench==0.1.8    # optional: airbench94's side (a wheel)
# (.device/ is git-ignored), then run `bash benchmarks/gpu_check.sh [tests] [profile] [throughput] [default] [tta]
# [folder]`.
# Everything printed also goes to $OUT/gpu_check.log, and the benchmarks' JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.device/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests profile throughput default tta folder}

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
                   -k "captured or cuda" ;;
        profile) python3 benchmarks/profile_step.py --preset fast --steps 20 --fit --epochs 2 --data-dir $DATA \
                     --output "$OUT" ;;
        throughput) python3 benchmarks/throughput.py --data-dir $DATA --batch-size 128 --output "$OUT" ;;
        default) for i in 1 2 3; do TIMEFORMAT="import torch, torchvision: %R s"; time python3 -c "import torch, torchvision"; done
                 rm -rf /tmp/default_run
                 TIMEFORMAT="python main.py, start to exit: %R s"
                 time python3 main.py --data-dir $DATA --output-dir /tmp/default_run --ask-epoch none \
                     | grep -E "^(Time|Test accuracy|Training ended)"
                 cp /tmp/default_run/best_model.json "$OUT/default_best_model.json" ;;
        tta) python3 benchmarks/time_to_accuracy.py --data-dir $DATA --output "$OUT" ;;
        folder) python3 benchmarks/folder_throughput.py --data-dir $DATA --output "$OUT" \
                    --work-dir /tmp/folder_throughput ;;
        *) echo "unknown part $part (tests, profile, throughput, default, tta, folder)" ;;
    esac
    echo "=== $part: exit $?, $((SECONDS - start)) s"
done
}
checks 2>&1 | tee -a "$OUT/gpu_check.log"
