#!/usr/bin/env bash
# The GPU figures the README still lacks, in one command on a lent device machine. Not yet run on a GPU: the
# whole is estimated at 6-9 minutes on an H100 with 16 cores, so give parts (two calls) if the device time is
# short. The machine has no ../shared: carry .device/, made here with
#   mkdir -p .device/tools .device/data && cp ../shared/tools/cifar10_from_jpeg.py .device/tools/ &&
#   cp -r ../shared/data/jpeg .device/data/
#   python3 -m pip wheel --no-deps -w .device/wheels airbench==0.1.8    # optional: airbench94's side (a wheel)
# (.device/ is git-ignored), then run `bash benchmarks/gpu_check.sh [tests] [throughput] [tta] [folder]`.
# Everything printed also goes to $OUT/gpu_check.log, and the benchmarks' JSON to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.device/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests throughput tta folder}

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
        tests) python3 -m pytest -q -p no:cacheprovider tests/test_train_module.py -k "captured or cuda" ;;
        throughput) for batch in 128 512; do
                python3 benchmarks/throughput.py --data-dir $DATA --batch-size $batch --output "$OUT"; done ;;
        tta) python3 benchmarks/time_to_accuracy.py --data-dir $DATA --output "$OUT" ;;
        folder) python3 benchmarks/folder_throughput.py --data-dir $DATA --output "$OUT" \
                    --work-dir /tmp/folder_throughput ;;
        *) echo "unknown part $part (tests, throughput, tta, folder)" ;;
    esac
    echo "=== $part: exit $?, $((SECONDS - start)) s"
done
}
checks 2>&1 | tee -a "$OUT/gpu_check.log"
