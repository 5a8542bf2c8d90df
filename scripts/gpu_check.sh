#!/usr/bin/env bash
# The GPU check (issue 12), in one go of at most 9 minutes on one H100/H200:
#   1. installs fms-speech's dependencies the machine lacks from scripts/wheels (no network
#      there; fetch them first with scripts/fetch_gpu_wheels.sh and carry scripts/wheels along);
#   2. runs the equivalence and compile tests on the device (tests/test_device.py: the reference
#      against fms-speech, eager and compiled, fp32 and bf16, graphs counted per phase);
#   3. runs `fms-speech bench` at the 3.3-2b shapes with all 16 encoder and 40 LLM layers
#      (random weights, bf16): fms and the reference eager first (no compiling: a ratio even if
#      time runs out), then fms compiled, fms compiled with CUDA graphs, and the reference
#      compiled (last: its recompilations are the slowest part);
# and writes check.log, summary.txt and the bench report (bench.md, bench.json, plots) into the
# output folder: --output-dir, else $OUT, else ./gpu-check.
#
#   scripts/gpu_check.sh [--device cuda] [--smoke] [--no-tests] [--systems "A B"] [--output-dir DIR]
#                        [--budget SECONDS]
#
# --no-tests leaves step 2 out: the bench alone, for a lease with too little time for both (the
# bench also compares every system's greedy tokens and logits with the reference's and counts
# the compiled graphs).
#
# --systems replaces the bench's systems (those of `fms-speech bench --systems`). On the H200 a
# compiled system takes about 350-400 s at the 3.3-2b shapes, so one call fits one of them:
# --no-tests --systems "fms-eager fms-compiled-cuda-graphs".
#
# --device cpu --smoke is the dry run tests/test_gpu_check.py makes on every CI run: the same
# steps on tiny shapes (the bench's --quick model, the tests without their compiled part).
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
smoke=0
with_tests=1
systems=""
out_dir="${OUT:-gpu-check}"
budget=540  # seconds for the whole check (a call may run 600 s)
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --smoke) smoke=1; shift ;;
        --no-tests) with_tests=0; shift ;;
        --systems) systems="$2"; shift 2 ;;
        --output-dir) out_dir="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
python="${PYTHON:-python3}"
mkdir -p "$out_dir"
log="$out_dir/check.log"
summary="$out_dir/summary.txt"
: > "$log"
: > "$summary"
started=$SECONDS
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$summary"; }

# run NAME LIMIT COMMAND...: one step, its output in the log, its exit code and time in the summary
run() {
    local name="$1" limit="$2"
    shift 2
    local step_start=$SECONDS
    echo "=== $name: $*" >> "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local code=$?
    note "$name: exit $code, $((SECONDS - step_start)) s$([ $code -eq 124 ] && echo " (stopped at its $limit s limit)")"
    return $code
}

# 1. dependencies: install only when some are missing (a dev machine has them all)
missing=$("$python" - <<'PY'
import importlib.util
modules = ["fms", "soxr", "soundfile", "espeakng_loader", "cffi"]
print(" ".join(m for m in modules if importlib.util.find_spec(m) is None))
PY
)
site="${TMPDIR:-/tmp}/fms-speech-site"
if [ -n "$missing" ]; then
    if ! ls scripts/wheels/*.whl > /dev/null 2>&1; then
        note "missing modules: $missing, and no wheels in scripts/wheels: run scripts/fetch_gpu_wheels.sh where pip reaches PyPI and carry scripts/wheels along"
        exit 2
    fi
    run "install ($missing)" 120 "$python" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target "$site" scripts/wheels/*.whl || exit 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$python" - >> "$summary" 2>&1 <<PY
import platform, torch, transformers, fms
device = torch.device("$device")
name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
print(f"device: {device} ({name}); python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PY
cat "$summary"
if [ "$device" != cpu ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi >> "$log" 2>&1
fi

# 2. the equivalence and compile tests on the device
# the compiled tests are marked slow (minutes on a 2-core CPU, about 100 s on an H200): the
# check asks for them, pytest's default (-m 'not slow') would leave them out
tests=(tests/test_device.py --device "$device" -p no:cacheprovider -q -rfE --durations=5)
if [ $smoke -eq 1 ]; then
    tests+=(-m "not slow")
else
    tests+=(-m "slow or not slow")
fi
if [ $with_tests -eq 1 ]; then
    run "tests on $device" 240 "$python" -m pytest "${tests[@]}"
    tests_code=$?
else
    note "tests on $device: left out (--no-tests)"
    tests_code=0
fi

# 3. the bench, in the time left
left=$((budget - (SECONDS - started) - 15))
if [ $smoke -eq 1 ]; then
    default_systems="ref-eager fms-eager fms-compiled"
    bench=(--quick --device "$device" --skip mixed warm-cache encoder-grid explain modules)
else
    default_systems="ref-eager fms-eager fms-compiled fms-compiled-cuda-graphs ref-compiled"
    # batch 4 alone: each compiled system compiles prefill and decode once (batch 1 would add
    # a graph per phase, minutes at these shapes); two warm-up calls: on the H200 (2026-11-27)
    # the first system's first shape (batch 1) ran slower than its batch of 4 (decode step 68
    # against 49 ms), a warm-up that one call did not cover
    bench=(--variant 3.3-2b --encoder-layers 16 --device "$device" --dtypes bfloat16
           --lengths 10 --batch-sizes 4 --max-new-tokens 16 --repeats 3 --warmup 2
           --skip mixed warm-cache encoder-grid explain modules)
fi
read -r -a chosen <<< "${systems:-$default_systems}"
bench+=(--systems "${chosen[@]}")
if [ $left -lt 60 ]; then
    note "bench: skipped, $left s left of the $budget s budget"
    bench_code=1
else
    run "bench" "$left" "$python" -m fms_speech.bench "${bench[@]}" --output-dir "$out_dir"
    bench_code=$?
    if [ $bench_code -ne 0 ] && [ -f "$out_dir/bench-partial.json" ]; then
        # stopped before its report: write one from what it measured
        "$python" -m fms_speech.bench.report "$out_dir/bench-partial.json" "$out_dir" >> "$log" 2>&1 \
            && note "bench: report written from the systems measured before it stopped"
    fi
fi
[ -f "$out_dir/bench.md" ] && rm -f "$out_dir/bench-partial.json"
note "total: $((SECONDS - started)) s"
[ $tests_code -eq 0 ] && [ $bench_code -eq 0 ]
