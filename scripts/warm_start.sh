#!/usr/bin/env bash
# The warm start of `fms-speech transcribe --compile`, measured as whole processes (issue 12):
# eager twice, --compile twice (cold caches, then warm), `fms-speech compile`, --compile twice
# on its packages, eager again; each line of DIR/times.txt is a process's wall time.
#   scripts/warm_start.sh MODEL_DIR CLIP [DIR]   (DIR default: ./warm-start; its caches start empty)
# Run it on a quiet machine: a second busy process changes every number.
set -u
model="$1"
clip="$2"
dir="${3:-warm-start}"
rm -rf "$dir/cache" "$dir/inductor" "$dir/times.txt"
mkdir -p "$dir"
export FMS_SPEECH_CACHE="$dir/cache" TORCHINDUCTOR_CACHE_DIR="$dir/inductor"
run() {
    local name="$1"
    shift
    local start end
    start=$(date +%s.%N)
    "$@" > "$dir/$name.out" 2> "$dir/$name.err"
    local code=$?
    end=$(date +%s.%N)
    echo "$name exit $code $(python3 -c "print(round($end - $start, 2))") s" | tee -a "$dir/times.txt"
}
run eager1 fms-speech transcribe "$clip" --model "$model" --no-progress
run eager2 fms-speech transcribe "$clip" --model "$model" --no-progress
run jit_cold fms-speech transcribe "$clip" --model "$model" --compile --no-progress
run jit_warm fms-speech transcribe "$clip" --model "$model" --compile --no-progress
run build fms-speech compile --model "$model"
run precompiled1 fms-speech transcribe "$clip" --model "$model" --compile --no-progress
run precompiled2 fms-speech transcribe "$clip" --model "$model" --compile --no-progress
run eager3 fms-speech transcribe "$clip" --model "$model" --no-progress
for name in eager1 jit_cold jit_warm precompiled1; do  # each path's text, to compare
    echo "$name: $(cat "$dir/$name.out")" | tee -a "$dir/times.txt"
done
