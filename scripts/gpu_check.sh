#!/usr/bin/env bash
# One-shot check of xytune on a bare NVIDIA GPU machine with no network (run from the repo root):
#
#   bash scripts/gpu_check.sh            # results under $OUT (default: ./out-gpu)
#   bash scripts/gpu_check.sh profile    # setup, then a default-bucket CUDA profile of smollm2-135m and
#                                        # SmoothGEMM against exact / pad-to-bucket / oracle on it
#
# The Python packages the machine lacks travel as wheels in .whl/ (cp312, manylinux x86_64; see the
# report that came with this script). Stages, each under `timeout`, a failure logged and the next stage run:
#   setup    wheels into /tmp/site, xytune itself (editable; else a plain install), versions, nvidia-smi
#   tests    the CUDA / Triton tests (junit XML)
#   profile  quick CUDA cost tables of smollm2-135m and llama-3.1-8b (presets: no GGUF needed), then `show`
#            (a profile that runs out of time is stopped with SIGTERM and saves its partial table); the Triton
#            GEMM against cuBLAS per M bucket from the table's rows; `bench kernels` on CUDA (Meta-Attention
#            against the SDPA loop and varlen FlashAttention, SmoothGEMM against exact / padded / oracle)
#   engine   scripts/gpu_engine_check.py: greedy float32 output against transformers on a tiny random
#            Llama written on the spot; then `xytune check --device cuda` with that model
#   diag     in the time left: the Triton Meta-Attention test and the engine check again under
#            TRITON_F32_DEFAULT=ieee when they failed (tells TF32 rounding from a wrong kernel)
# Outputs ($OUT, 9 files): gpu_log.txt, summary.txt, gpu_tests.xml, cuda-h200-smollm2-135m.parquet,
# cuda-h200-llama-3.1-8b.parquet, triton_vs_cublas.csv, bench_kernels_cuda.json, engine_check.json,
# check_cuda.json.
# The whole run stops starting stages past GPU_CHECK_DEADLINE_S seconds (default 450) and shortens the
# last ones to fit; every stage keeps some time back for the ones after it.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-$PWD/out-gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu_log.txt
SUMMARY=$OUT/summary.txt
DEADLINE=${GPU_CHECK_DEADLINE_S:-450}
# profile settings: bf16 only and 6 Optuna trials per shape keep the Triton compiles (one per new tile
# config) inside the budget; the CLI defaults (bfloat16,float16 and 24 trials) would take far longer
PROFILE_ARGS=${GPU_CHECK_PROFILE_ARGS:---quick --dtypes bfloat16 --trials 6}
T0=$SECONDS
RESULTS=()
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 XYTUNE_CACHE=/tmp/xytune-cache COLUMNS=160

elapsed() { echo $((SECONDS - T0)); }

# stage NAME CAP_S RESERVE_S 'command': runs the command under timeout, at most CAP_S seconds and never
# into the last RESERVE_S seconds before the deadline (kept for later stages); records OK/FAIL/TIMEOUT/SKIP.
stage() {
    local name=$1 cap=$2 reserve=$3 cmd=$4
    local left=$((DEADLINE - $(elapsed) - reserve))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        echo "=== SKIP $name: only ${left}s left before the deadline"
        RESULTS+=("$(printf '%-8s %-26s %s' SKIP "$name" "no time left")")
        return 99
    fi
    echo
    echo "=== [$(date +%T) +$(elapsed)s] $name (limit ${limit}s)"
    echo "\$ $cmd"
    local start=$SECONDS rc status
    timeout -k 15 -s TERM "$limit" bash -c "$cmd"
    rc=$?
    status=OK
    ((rc != 0)) && status=FAIL
    ((rc == 124 || rc == 137)) && status=TIMEOUT
    echo "=== $status $name: rc=$rc after $((SECONDS - start))s"
    RESULTS+=("$(printf '%-8s %-26s rc=%-4s %4ss' "$status" "$name" "$rc" "$((SECONDS - start))")")
    return "$rc"
}

main() {
    echo "xytune GPU check, $(date -u +%FT%TZ), repo $(pwd), OUT=$OUT, deadline ${DEADLINE}s"
    git log -1 --oneline 2>/dev/null || true
    git status --short 2>/dev/null | head -30 || true

    # ---------------------------------------------------------------- setup
    stage "machine" 30 400 'nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
        nproc; free -g | head -2; which python3; python3 --version'
    stage "wheels" 90 380 'ls .whl | head -40; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl'
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    PY=python3
    # xytune maps xytune.kernels -> kernels/ and xytune.runtime -> runtime/ (package-dir): an editable install's
    # finder resolves them from any working directory, the repo root included
    if stage "install-editable" 120 360 'python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . &&
            (cd /tmp && python3 -c "import xytune.runtime, xytune.kernels, xytune.cli; print(\"xytune importable:\", xytune.runtime.__file__)") &&
            python3 -c "import xytune.runtime, xytune.kernels; print(\"from the repo root too\")"'; then
        :
    else
        # a plain install into /tmp/site-xy; `python3 -P` keeps the repo root's xytune/ (which lacks
        # runtime/ and kernels/) off sys.path so the installed package is the one imported
        stage "install-plain" 120 340 'python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site-xy . &&
            PYTHONPATH=/tmp/site-xy:$PYTHONPATH python3 -P -c "import xytune.runtime, xytune.kernels, xytune.cli; print(\"xytune importable:\", xytune.runtime.__file__)"'
        export PYTHONPATH=/tmp/site-xy:$PYTHONPATH PATH=/tmp/site-xy/bin:$PATH
        PY="python3 -P"
    fi
    export PY
    XY="$PY -m xytune.cli"
    stage "versions" 60 340 "$PY"' - <<'"'"'EOF'"'"'
import importlib, importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
    print("allow_tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
for name in ["triton", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pyarrow", "scipy", "typer",
             "rich", "optuna", "sqlalchemy", "alembic", "gguf", "fastapi", "starlette", "uvicorn", "pydantic",
             "pydantic-core", "openai", "anyio", "typing-extensions", "pytest", "hypothesis", "xytune"]:
    try:
        print(f"{name:18s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:18s} MISSING")
for mod in ["optuna", "gguf", "fastapi", "uvicorn", "pydantic", "openai", "triton", "xytune.cli", "xytune.runtime.serve.app",
            "xytune.kernels.meta_attention.triton_backend", "xytune.kernels.triton_gemm"]:
    try:
        importlib.import_module(mod)
        print("import ok  ", mod)
    except Exception as exc:
        print("IMPORT FAIL", mod, type(exc).__name__, exc)
EOF
python3 -m pip check 2>&1 | head -20 || true'

    if [[ ${MODE:-check} == profile ]]; then
        local table=$OUT/cuda-h200-smollm2-135m.parquet
        stage "profile-full" 300 100 "$XY profile --device cuda --model smollm2-135m --dtypes bfloat16,float16 --trials 6 -o $table --overwrite --no-progress"
        [[ -f $table ]] && stage "show" 30 90 "$XY show $table"
        [[ -f $table ]] && stage "bench-smoothgemm" 150 0 "$XY bench kernels --profile $table --device cuda --skip-attention --dtype bfloat16 --repeats 7 --json $OUT/bench_smoothgemm_cuda.json"
        printf '%s\n' "${RESULTS[@]}" >"$SUMMARY"
        return
    fi

    # ---------------------------------------------------------------- tests
    local timeout_flag="" tests_rc=0 engine_rc=0
    $PY -c "import pytest_timeout" 2>/dev/null && timeout_flag="--timeout=240"
    # the files with CUDA / Triton paths (the two engine-on-CUDA tests skip: they need the default model's
    # GGUF, which stays behind; scripts/gpu_engine_check.py covers them) and two quick ones for the carried
    # optuna wheel and cost tables with CUDA present; no -x: one run should report every failure
    local tests="tests/test_accelerators.py tests/test_meta_attention_triton.py tests/test_optuna_search.py tests/test_cost_model.py tests/test_smooth_gemm.py"
    stage "pytest-gpu" 150 270 "$PY -m pytest -q -rfEs -p no:cacheprovider $timeout_flag --junitxml=$OUT/gpu_tests.xml $tests"
    tests_rc=$?

    # ---------------------------------------------------------------- profiles
    local small=$OUT/cuda-h200-smollm2-135m.parquet big=$OUT/cuda-h200-llama-3.1-8b.parquet
    stage "profile-smollm2" 90 200 "$XY profile --device cuda --model smollm2-135m $PROFILE_ARGS -o $small --overwrite --no-progress"
    [[ -f $small ]] && stage "show-smollm2" 30 190 "$XY show $small"
    stage "profile-llama8b" 60 160 "$XY profile --device cuda --model llama-3.1-8b $PROFILE_ARGS -o $big --overwrite --no-progress"
    [[ -f $big ]] && stage "show-llama8b" 30 150 "$XY show $big"
    # the Triton GEMM against cuBLAS (torch.linear) at every M bucket of the table, from its own rows
    [[ -f $small ]] && stage "triton-vs-cublas" 20 140 "$PY - $small $OUT/triton_vs_cublas.csv"' <<'"'"'EOF'"'"'
import sys
from xytune.profiler.table import read_table
rows = read_table(sys.argv[1]).rows
gemm = rows[rows["op"] == "gemm"]
best = gemm.groupby(["target", "m", "dtype", "primitive"])["median_s"].min().unstack("primitive")
if "triton.tiled_gemm" not in best or "torch.linear" not in best:
    sys.exit("the table lacks triton.tiled_gemm or torch.linear rows")
best["cublas_over_triton"] = best["torch.linear"] / best["triton.tiled_gemm"]
best.to_csv(sys.argv[2])
print(best["cublas_over_triton"].groupby(level="target").describe().to_string())
EOF'
    # Meta-Attention (Triton) against the SDPA loop and varlen FlashAttention, SmoothGEMM against exact (cuBLAS),
    # pad-to-bucket and the per-M oracle, on the table just made
    [[ -f $small ]] && stage "bench-kernels" 90 120 "$XY bench kernels --profile $small --device cuda --dtype bfloat16 --repeats 7 --json $OUT/bench_kernels_cuda.json"

    # ---------------------------------------------------------------- engine vs transformers
    stage "engine-check" 140 60 "$PY scripts/gpu_engine_check.py --device cuda --workdir /tmp/engine-check --profile-timeout 70 --json $OUT/engine_check.json"
    engine_rc=$?
    # first contact as a user makes it: every backend against float64, a short profile, greedy tokens; with the
    # tiny Llama the engine check left (the default model's GGUF stays behind)
    local tiny=/tmp/engine-check/tiny-llama
    [[ -d $tiny ]] && stage "xytune-check" 90 50 "$XY check --device cuda --model $tiny --profile-max-tokens 256 --json > $OUT/check_cuda.json; rc=\$?; cat $OUT/check_cuda.json; exit \$rc"

    # ---------------------------------------------------------------- diagnoses, in the time left
    # float32 tl.dot runs on TF32 by default on CUDA: a failure that goes away under IEEE float32 is rounding
    if ((engine_rc == 1)); then
        stage "diag-engine-ieee" 50 0 "TRITON_F32_DEFAULT=ieee TRITON_CACHE_DIR=/tmp/triton-ieee $PY scripts/gpu_engine_check.py --device cuda --workdir /tmp/engine-check --reuse --variants meta,meta-chunk7,meta-smooth"
    fi

    if ((tests_rc != 0)); then
        stage "diag-meta-attn-ieee" 50 0 "TRITON_F32_DEFAULT=ieee TRITON_CACHE_DIR=/tmp/triton-ieee $PY -m pytest -q -rfEs -p no:cacheprovider tests/test_meta_attention_triton.py"
    fi
    rm -f "$OUT"/.*.tmp 2>/dev/null  # a profile killed mid-write leaves its temp file
    {
        echo "xytune GPU check summary ($(date -u +%FT%TZ), $(elapsed)s in all, deadline ${DEADLINE}s)"
        git log -1 --oneline 2>/dev/null
        echo
        printf '%s\n' "${RESULTS[@]}"
        echo
        echo "-- key lines of gpu_log.txt"
        grep -aE '^(gpu |torch |IMPORT FAIL|xytune importable)|passed|failed|[0-9]+ error|^(PASS|FAIL) |ENGINE CHECK|logit gap at|^wrote|error:|Traceback|SmoothGEMM mean' "$LOG" | grep -v '^===' | head -80
        echo
        ls -la "$OUT"
    } >"$SUMMARY" 2>&1
    echo
    cat "$SUMMARY"
}

MODE=${1:-check}
main 2>&1 | tee -a "$LOG"
exit 0
