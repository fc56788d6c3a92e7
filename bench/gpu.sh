#!/usr/bin/env bash
# One call on a GPU machine measures what issue 16's acceptance lists, in about 8 minutes on one H100/H200:
# the `cuda` tests, `bench/prior.py --suite gpu` and `bench/decoder.py --suite gpu` (prior batch 32/512, decoder
# batch 8/64, both precisions, DALLE2-pytorch 1.15.6 in the same run and in paired rounds), the text -> 64-px
# image latency (`bench/generate.py`), the quick demo (`train/demo.py preset=quick`) within a time limit, and
# activation checkpointing's peak memory and slowdown per model (`bench/checkpointing.py --suite gpu`).
#
# 1. On a machine with network, from the repository root (the GPU machine has none):
#      bash bench/gpu.sh prepare          # = bash ../shared/gpu/wheels.sh .whl reference, plus pytest's wheels
#    or by hand:
#      bash ../shared/gpu/wheels.sh .whl reference      # /work/shared/gpu/wheels.sh from a helper's worktree
#      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform any -d .whl/test pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.3
# 2. Carry .whl (ignored by git) to the GPU machine with the working tree and run, from the repository root:
#      bash bench/gpu.sh                  # results under $OUT, or ./gpu-results when OUT is unset
#
# The GPU machine needs python 3.12 with torch (CUDA), accelerate, transformers, einops and safetensors; the
# other packages come from .whl: unclip's into /tmp/site, DALLE2-pytorch's into /tmp/ref (`--reference /tmp/ref`),
# pytest's into /tmp/site-test where the image has no pytest. Everything is written under $OUT: progress.log (what
# ran, when, and its exit code), env.txt, one .log per step (stdout and stderr) and its closing JSON line as .json
# (prior.json, decoder.json, generate.json, generate-256.json, checkpointing.json, demo-metrics.json), the demo's grid, and summary.txt
# (every goal and its verdict). A step that fails or runs out of time is logged and the script goes on.
# GPU_BUDGET_S (default 550) bounds the whole run; WHEELS (default .whl) and PYTHON (default python3) may be set.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == prepare ]]; then
  dir=${2:-.whl}
  wheels=${WHEELS_SCRIPT:-../shared/gpu/wheels.sh}
  [[ -f $wheels ]] || wheels=/work/shared/gpu/wheels.sh
  bash "$wheels" "$dir" reference
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform any -d "$dir/test" pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 packaging==26.3
  ls "$dir" "$dir/test"
  exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-results}
WHEELS=${WHEELS:-.whl}
BUDGET=${GPU_BUDGET_S:-550}
mkdir -p "$OUT"
start=$SECONDS
say() { printf '[gpu.sh %4ds] %s\n' $((SECONDS - start)) "$*" | tee -a "$OUT/progress.log"; }
left() { echo $((BUDGET - (SECONDS - start))); }
cap() { local want=$1 reserve=${2:-0} room; room=$(($(left) - reserve)); echo $((want < room ? want : room)); }

# step NAME SECONDS CMD...: run CMD with a time limit, output to NAME.log, its last line to NAME.json if JSON
step() {
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if ((limit < 20)); then say "$name: skipped, only ${limit}s of the budget left"; return 1; fi
  say "$name: start (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 1 "$OUT/$name.log" | "$PY" -c 'import json,sys; json.loads(sys.stdin.read())' 2>/dev/null \
    && tail -n 1 "$OUT/$name.log" >"$OUT/$name.json"
  say "$name: exit $rc after $((SECONDS - t0))s$([[ $rc == 124 ]] && echo ' (out of time)')"
  return $rc
}

# -- installs -------------------------------------------------------------------------------------------
say "installing the carried wheels from $WHEELS"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "no wheels in $WHEELS: run 'bash bench/gpu.sh prepare' on a machine with network and carry .whl"
fi
"$PY" -m pip install -q --no-compile --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl >>"$OUT/install.log" 2>&1
REFERENCE=()
if ls "$WHEELS"/reference/*.whl >/dev/null 2>&1 \
  && "$PY" -m pip install -q --no-compile --no-index --no-deps --target /tmp/ref "$WHEELS"/reference/*.whl >>"$OUT/install.log" 2>&1; then
  REFERENCE=(--reference /tmp/ref)
else
  say "DALLE2-pytorch not installed: the benchmarks run without the reference"
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1
TEST_PATH=$PYTHONPATH
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pip install -q --no-compile --no-index --no-deps --target /tmp/site-test "$WHEELS"/test/*.whl >>"$OUT/install.log" 2>&1
  TEST_PATH=/tmp/site-test:$PYTHONPATH
fi
{
  nvidia-smi 2>&1
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported(),
          "| float32 matmul precision", torch.get_float32_matmul_precision())
EOF
} >"$OUT/env.txt" 2>&1
say "$(tail -n 2 "$OUT/env.txt" | tr '\n' ' ')"

# -- the quick demo (in the background, beside the tests: neither is timed against the other) ------------
# timeout signals its whole process group, so the demo's stage jobs end with it.
rm -rf /tmp/demo-quick
limit=$(cap 300 330)
if ((limit >= 20)); then
  say "demo: start in the background (limit ${limit}s): train/demo.py preset=quick out=/tmp/demo-quick"
  timeout --kill-after=10 "$limit" "$PY" train/demo.py preset=quick out=/tmp/demo-quick >"$OUT/demo.log" 2>&1 &
else
  say "demo: skipped, only ${limit}s of the budget left for it"
  true &
fi
demo=$!

# -- tests ----------------------------------------------------------------------------------------------
step cuda-tests "$(cap 200 360)" env PYTHONPATH="$TEST_PATH" "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda \
  tests/test_cuda.py
step cpu-path-tests "$(cap 60 340)" env PYTHONPATH="$TEST_PATH" "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_flops.py tests/test_precision.py tests/test_graphs.py

wait "$demo"
rc=$?
[[ -f $OUT/demo.log ]] && say "demo: exit $rc$([[ $rc == 124 ]] && echo ' (out of time)')"
cp /tmp/demo-quick/metrics.json "$OUT/demo-metrics.json" 2>/dev/null
cp /tmp/demo-quick/grid.png "$OUT/demo-grid.png" 2>/dev/null
for stage in /tmp/demo-quick/*/metrics.json; do
  [[ -f $stage ]] && cp "$stage" "$OUT/demo-$(basename "$(dirname "$stage")")-metrics.json"
done

# -- benchmarks: the GPU to themselves -------------------------------------------------------------------
step generate "$(cap 60 435)" "$PY" bench/generate.py
step generate-256 "$(cap 45 390)" "$PY" bench/generate.py --size 256
step prior "$(cap 150 240)" "$PY" bench/prior.py --suite gpu --sample-runs 2 "${REFERENCE[@]}"
step decoder "$(cap 240 90)" "$PY" bench/decoder.py --suite gpu --sample-runs 2 "${REFERENCE[@]}"
step checkpointing "$(cap 120 0)" "$PY" bench/checkpointing.py --suite gpu --steps 3

# -- summary --------------------------------------------------------------------------------------------
"$PY" - "$OUT" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print((out / "env.txt").read_text().strip().splitlines()[-1] if (out / "env.txt").exists() else "no env.txt")
for name in ("generate", "generate-256", "prior", "decoder"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"\n{name}: no JSON line (see {name}.log)")
        continue
    data = json.loads(path.read_text())
    print(f"\n{name}:")
    for run in data.get("runs", []):
        results = run["results"]
        speeds = ", ".join(f"{k} {run['batch'] / v['step_s']:.0f}/s" for k, v in results.items() if "step_s" in v)
        print(f"  batch {run['batch']}: default {run['default_precision']}; train samples/s: {speeds}")
        for key, value in (run.get("paired") or {}).items():
            if "/" in key:
                print(f"    paired {key}: {value:.2f}")
    for goal in data.get("goals", []):
        value = "-" if goal["value"] is None else f"{goal['value']:.3f}"
        print(f"  goal: {goal['description']} (target {goal['target']:.3g}): {value} -> {goal['verdict']}")
    if name.startswith("generate"):
        print("  seconds:", data["seconds"])
path = out / "checkpointing.json"
print("\ncheckpointing:" + ("" if path.exists() else " no JSON line (see checkpointing.log)"))
for run in json.loads(path.read_text())["runs"] if path.exists() else []:
    off, on = run["off"]["memory"]["peak_mb"], run["on"]["memory"]["peak_mb"]
    print(f"  {run['model']} batch {run['batch']}: peak {off:.0f} -> {on:.0f} MB, step x{run['slowdown']:.2f}")
metrics = out / "demo-metrics.json"
print("\ndemo:", metrics.read_text() if metrics.exists() else "no metrics.json (see demo.log)")
for log in ("cuda-tests", "cpu-path-tests"):
    path = out / f"{log}.log"
    lines = path.read_text().strip().splitlines() if path.exists() else ["not run"]
    print(f"{log}: {lines[-1] if lines else 'empty log'}")
EOF
cat "$OUT/summary.txt"
say "done in $((SECONDS - start))s; results in $OUT"
