#!/usr/bin/env bash
# The GPU checks on a lent GPU machine: the CUDA tests, then the benchmark table in float32, the
# same at batch 16 with CUDA graphs, occlusion, bfloat16, activation maximization, then the
# pipeline with the JPEGs decoded on the GPU instead of in processes; logs and JSON land in $OUT
# (8 files: at most that many come back per call). float16 was measured on the H200 (2026-11-30)
# and gave way to the CUDA graphs step.
#
# Before the calls, here: bash scripts/gpu_wheels.sh (fills the ignored folder .whl/). Then two
# calls of the device tool (a call runs 600 s at most, and the steps together need more):
#   run(command="CAMSHAFT_CHECK_STEPS=tests,float32 bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   run(command="CAMSHAFT_CHECK_STEPS=graphs,occlusion,bfloat16,actmax,decode bash scripts/gpu_check.sh",
#       carry=[".whl"], timeout_s=600)
# (CAMSHAFT_CHECK_STEPS unset: every step, in this order.) Each step has its own time limit, so a
# slow one costs its own figures only (and a benchmark cut short keeps the groups it measured:
# --json is saved after each group); the call's output says how each ended. A step out of time is
# interrupted with SIGINT, so pytest still prints its failures and slowest tests. On an H200
# (2026-11-30) the steps took 45 (fewer tests then), over 190 (the float32 table, then without
# --pipeline-batches), 52, 31, 27 and 26 s, and the machine's start about 30 s.
# To try the script without a GPU (here: about 5 minutes, and .whl/ moved aside: its wheels are for
# the machine's Python 3.12):
#   CAMSHAFT_CHECK_DEVICE=cpu CAMSHAFT_CHECK_QUICK=1 CAMSHAFT_CHECK_MODEL=demo OUT=/tmp/x bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/camshaft-gpu-check}
mkdir -p "$OUT"
device=${CAMSHAFT_CHECK_DEVICE:-cuda}
quick=()
[ -n "${CAMSHAFT_CHECK_QUICK:-}" ] && quick=(--quick)
export PYTHONUNBUFFERED=1 CAMSHAFT_TEST_DEVICE=$device
if [ -d .whl ]; then  # the machine has no network: the missing packages travel as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed" >"$OUT/info.txt"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi

{
    date -u
    nvidia-smi 2>&1 | head -20
    python3 - <<'PY'
import torch, torchvision, onnxruntime
print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__)
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
print("devices", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
PY
} >"$OUT/info.txt" 2>&1

steps=",${CAMSHAFT_CHECK_STEPS:-tests,float32,graphs,occlusion,bfloat16,actmax,decode},"
wanted() { [[ $steps == *",$1,"* ]]; }

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    # SIGINT first: pytest and camshaft bench print what they have (failures, measured groups) on it
    timeout -s INT -k 20 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s"  # in the call's output, not a file: 8 files come back
}

backends=(eager torchscript)  # ONNX Runtime too on the CPU, or where it has a CUDA provider (onnxruntime-gpu)
if [ "$device" = cpu ] || python3 -c "import onnxruntime as o, sys
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    backends+=(onnxruntime)
fi
model=${CAMSHAFT_CHECK_MODEL:-resnet50}

bench() {  # bench SECONDS ARGS...: camshaft bench on the device, as one step
    local limit=$1
    shift
    step bench "$limit" python3 -m camshaft bench --device "$device" "${quick[@]}" "$@"
}

wanted tests && step tests 200 python3 -m pytest -m gpu tests/test_gpu.py tests/test_determinism_audit.py \
    -p no:cacheprovider -q -rs --durations=15
# float32: Grad-CAM and CAM at batch 16 and 64, and the decode + explain + write pipeline (decoding
# in worker processes, explain's default on a GPU)
wanted float32 && bench 260 --model "$model" --backend "${backends[@]}" --method cam gradcam --targets top:1 top:5 \
    --batch-size 16 64 --pipeline --pipeline-batches 32 --json "$OUT/bench-float32.json"
# batch 16 with CUDA graphs (launch-bound without them), against graphed limits too (CUDA only)
[ "$device" = cpu ] || ! wanted graphs || bench 75 --model "$model" --backend eager torchscript --method cam gradcam \
    --targets top:1 top:5 --batch-size 16 --cuda-graphs --no-peers --json "$OUT/bench-graphs.json"
# occlusion, as its target is set: resnet18, batch 16, top-1 (a sweep is 169 forwards per image)
wanted occlusion && bench 75 --model "${CAMSHAFT_CHECK_MODEL:-resnet18}" --backend "${backends[@]}" --method occlusion \
    --batch-size 16 --json "$OUT/bench-occlusion.json"
# mixed precision at the targets' batch size
wanted bfloat16 && bench 75 --dtype bfloat16 --model "$model" --backend "${backends[@]}" --method cam gradcam \
    --targets top:1 top:5 --batch-size 16 --json "$OUT/bench-bfloat16.json"
wanted actmax && bench 50 --model resnet18 --method cam --backend eager --actmax --json "$OUT/bench-actmax.json"
# the same pipeline with the JPEGs decoded on the GPU (nvJPEG), for comparison with the processes of
# the float32 table (this one lands in bench.log: 8 files come back)
wanted decode && bench 75 --model "$model" --backend torchscript --method cam --batch-size 16 --pipeline \
    --pipeline-batches 32 --decode device --no-peers
exit 0
