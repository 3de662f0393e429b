#!/usr/bin/env bash
# One prepared GPU run: installs the carried wheels, then runs the GPU tests and the benches, each
# part under its own time limit inside one overall budget (default 450 s, so the whole script ends
# within 8 minutes on an H200), and writes every JSON row, each part's log, the environment and a
# one-page summary into OUTDIR.
#
#   bash bench/gpu_suite.sh OUTDIR [--export DIR] [--only PART,PART] [--budget SECONDS] [--wheels DIR]
#   bash bench/gpu_suite.sh OUTDIR --dry-run     # CPU rehearsal: every part at toy sizes (GPU_SUITE_DRY=1 too)
#   bash bench/gpu_suite.sh --list [--dry-run]   # the parts, in order, with their time limits
#
# --export DIR  after every part, copy summary.md and a gzipped tar of OUTDIR (gpu-suite.tar.gz)
#               into DIR: two files, so a run stopped half-way still hands back what finished.
# --only        run only these parts (install and env always run first).
# --wheels      the wheel folder (default bench/.gpu_wheels, filled by bench/gpu_wheels.sh).
#
# Parts never share a failure: there is no `set -e` across them, each runs in its own process
# under `timeout`, and the summary marks each ok / failed / timed out / skipped with its wall
# time. A part is skipped when less than its minimum start time is left of the budget; a part's
# limit is cut to what is left, and a bench part hands its limit less a margin (10%, at least
# 5 s) to the bench as --time-budget. Environment: GPU_SUITE_COMMIT (the commit when the tree
# has no .git; the benches stamp their rows with it), GPU_SUITE_PYTHON (default python3;
# .venv/bin/python in a dry run when present), GPU_SUITE_PYTEST_WORKERS (pytest-xdist workers
# on the GPU, default 4 when xdist is installed).
set -u -o pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(cd "$(dirname "$SELF")/.." && pwd)"

# In order of value: correctness of the never-run GPU code first, then the headline SD3.5 numbers,
# then FLUX, then the cases most likely to run out of memory or time.
GPU_PARTS=(install env pytest_gpu kernels_sd35 sampler_sd35_b8 sampler_sd35_b16 sampler_sd35_b24
           train_sd35_lora sampler_flux_b8 train_flux_lora kernels_flux_large kernels_compile_sd35
           train_sd35_full train_flux_full)
# The dry run adds two parts that fail on purpose, placed between real parts: the ones after them
# must still run and be reported.
DRY_PARTS=(install env pytest_gpu kernels_sd35 dry_fail sampler_sd35_b8 sampler_sd35_b16
           sampler_sd35_b24 dry_timeout train_sd35_lora sampler_flux_b8 train_flux_lora
           kernels_flux_large kernels_compile_sd35 train_sd35_full train_flux_full)
declare -A EXPECTED=([dry_fail]="failed" [dry_timeout]="timed out")
# Seconds each part may take on an H200 (estimates from the FLOP counts of bench/models.py at
# ~400 TFLOP/s plus process start, model build, graph capture and compilation; see
# docs/performance.md). Their sum exceeds the budget on purpose: parts that finish early leave
# time to the later ones, and the budget cuts the tail.
declare -A GPU_LIMIT=([install]=60 [env]=30 [pytest_gpu]=150 [kernels_sd35]=45
                      [sampler_sd35_b8]=50 [sampler_sd35_b16]=60 [sampler_sd35_b24]=75
                      [train_sd35_lora]=75 [sampler_flux_b8]=90 [train_flux_lora]=90
                      [kernels_flux_large]=45 [kernels_compile_sd35]=90 [train_sd35_full]=90
                      [train_flux_full]=60)
DRY_LIMIT_DEFAULT=90
declare -A DRY_LIMIT=([dry_timeout]=3)

die() { echo "gpu_suite.sh: $*" >&2; exit 2; }

# ----------------------------------------------------------------------------- the parts
# Each runs as `bash gpu_suite.sh --part NAME` in its own process (under timeout), in the
# repository root, with the environment the main process exported (GPU_SUITE_*).

dry() { [ "$GPU_SUITE_DRY" = 1 ]; }
# A bench appends each row the moment it is measured, and with --time-budget starts no case that
# would end past it (counted from its own start) and exits 0: the budget is the part's limit
# less a margin for the process to exit, so a part usually ends by itself, and a kill at the
# limit still keeps every row measured before it.
bench_budget() {
    local limit=${GPU_SUITE_PART_LIMIT:-0} margin
    margin=$(( limit / 10 ))
    [ "$margin" -ge "$BENCH_MARGIN" ] || margin=$BENCH_MARGIN
    echo $(( limit > margin ? limit - margin : 0 ))
}
bench() { "$PY" "bench/$1" --out "$OUTDIR" --time-budget "$(bench_budget)" "${@:2}"; }
sampler() { bench sampler_throughput.py "$@"; }
train() { bench train_step.py "$@"; }
kernels_bench() { bench kernels.py "$@"; }

part_install() {
    shopt -s nullglob
    local wheels=("$GPU_SUITE_WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no wheels in $GPU_SUITE_WHEELS: run bench/gpu_wheels.sh where the registries are reachable and carry the folder"
        return 3
    fi
    echo "# installing ${#wheels[@]} wheels into $GPU_SUITE_SITE (no index, no dependencies: the image's torch is kept)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$GPU_SUITE_SITE" "${wheels[@]}" || return
    "$PY" bench/gpu_env.py check-wheels "$GPU_SUITE_WHEELS" "$GPU_SUITE_SITE"
}

part_env() {
    {
        echo "## nvidia-smi (read only)"
        if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1; else echo "(nvidia-smi not available)"; fi
        echo; echo "## uname -a"; uname -a
        echo; echo "## python -m pip list"; "$PY" -m pip list --disable-pip-version-check 2>&1
    } >"$OUTDIR/env.txt"
    "$PY" bench/gpu_env.py record "$OUTDIR/env.json" --commit "$GPU_SUITE_COMMIT"
}

part_pytest_gpu() {
    local args=(-m gpu -q -rfE -p no:cacheprovider --continue-on-collection-errors --durations 15
                --junitxml "$OUTDIR/pytest_gpu.xml")
    # tests/ import each other as the package `tests`: the repository root goes on the path, after
    # the fastflow that carries fastflow.kernels.
    export PYTHONPATH="$PYTHONPATH:$ROOT"
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then args+=(--timeout 90); fi
    local workers=${GPU_SUITE_PYTEST_WORKERS:-4}
    if dry; then workers=0; fi
    if [ "$workers" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then args+=(-n "$workers"); fi
    echo "# pytest ${args[*]} tests"
    "$PY" -m pytest "${args[@]}" tests
}

# torch.compile of the reference (four graphs per case, compiled at their first call) is the
# slowest and least needed kernels column: its own part, late, so the triton / eager rows of
# the first part never wait on it.
part_kernels_sd35() {
    if dry; then kernels_bench --device cpu --cases tiny --reps 1
    else kernels_bench --device cuda --cases sd35 --no-compile --reps 20; fi
}
part_kernels_flux_large() {
    if dry; then kernels_bench --device cpu --cases small --reps 1
    else kernels_bench --device cuda --cases flux large --no-compile --reps 20; fi
}
part_kernels_compile_sd35() {
    if dry; then kernels_bench --device cpu --cases tiny --reps 1
    else kernels_bench --device cuda --cases sd35 --reps 20; fi
}

sampler_part() {  # MODEL BATCH
    if dry; then sampler --device cpu --models "$1" --batch-sizes $(( $2 / 8 )) --repeats 1 --warmup 1
    else sampler --device cuda --models "$1" --batch-sizes "$2" --repeats 3 --warmup 1; fi
}
part_sampler_sd35_b8() { sampler_part sd3.5-medium 8; }
part_sampler_sd35_b16() { sampler_part sd3.5-medium 16; }
part_sampler_sd35_b24() { sampler_part sd3.5-medium 24; }
part_sampler_flux_b8() { sampler_part flux.1-dev 8; }

train_part() {  # MODEL FINETUNE
    if dry; then train --device cpu --models "$1" --finetune "$2" --batch-size 2 --repeats 1 --warmup 1
    else train --device cuda --models "$1" --finetune "$2" --kernels triton,torch --batch-size 8 --repeats 2 --warmup 1; fi
}
part_train_sd35_lora() { train_part sd3.5-medium lora; }
part_train_sd35_full() { train_part sd3.5-medium full; }
part_train_flux_lora() { train_part flux.1-dev lora; }
part_train_flux_full() { train_part flux.1-dev full; }

part_dry_fail() { echo "failing on purpose (rehearsal of a broken part)"; return 3; }
part_dry_timeout() { echo "sleeping past the limit on purpose (rehearsal of a hung part)"; sleep 60; }

if [ "${1:-}" = "--part" ]; then
    cd "$ROOT" || exit 1
    "part_$2"
    exit
fi

# ----------------------------------------------------------------------------- arguments
OUTDIR="" EXPORT="" ONLY="" BUDGET="" LIST=0
DRY=${GPU_SUITE_DRY:-0}
WHEELS=${GPU_SUITE_WHEELS:-$ROOT/bench/.gpu_wheels}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --list) LIST=1; shift ;;
        --export|--only|--budget|--wheels)
            [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"
            case "$1" in --export) EXPORT=$2 ;; --only) ONLY=$2 ;; --budget) BUDGET=$2 ;; --wheels) WHEELS=$2 ;; esac
            shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$SELF"; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) [ -z "$OUTDIR" ] || die "one OUTDIR only, got '$OUTDIR' and '$1'"; OUTDIR=$1; shift ;;
    esac
done
[ "$DRY" = 0 ] || [ "$DRY" = 1 ] || die "GPU_SUITE_DRY must be 0 or 1, got '$DRY'"
if [ "$DRY" = 1 ]; then ALL=("${DRY_PARTS[@]}"); MODE=dry-run; else ALL=("${GPU_PARTS[@]}"); MODE=gpu; fi
limit_of() {
    if [ "$DRY" = 1 ]; then echo "${DRY_LIMIT[$1]:-$DRY_LIMIT_DEFAULT}"; else echo "${GPU_LIMIT[$1]}"; fi
}
if [ "$LIST" = 1 ]; then
    for p in "${ALL[@]}"; do printf '%-20s %4s s\n' "$p" "$(limit_of "$p")"; done
    exit 0
fi
[ -n "$OUTDIR" ] || die "give an output folder: bash bench/gpu_suite.sh OUTDIR (see --help)"
if [ -e "$OUTDIR" ] && { [ ! -d "$OUTDIR" ] || [ -n "$(ls -A "$OUTDIR" 2>/dev/null)" ]; }; then
    die "OUTDIR '$OUTDIR' exists and is not an empty folder (results are never mixed)"
fi
if [ -z "$BUDGET" ]; then
    if [ "$DRY" = 1 ]; then BUDGET=300; else BUDGET=450; fi
fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "--budget must be whole seconds, got '$BUDGET'"
SELECTED=()
if [ -n "$ONLY" ]; then
    IFS=', ' read -r -a wanted <<<"$ONLY"
    for w in "${wanted[@]}"; do
        [ -n "$w" ] || continue
        found=0
        for p in "${ALL[@]}"; do [ "$p" = "$w" ] && found=1; done
        [ $found = 1 ] || die "--only: unknown part '$w' for a $MODE run; known: ${ALL[*]}"
    done
    for p in "${ALL[@]}"; do
        keep=0
        case "$p" in install|env) keep=1 ;; esac
        for w in "${wanted[@]}"; do [ "$p" = "$w" ] && keep=1; done
        [ $keep = 1 ] && SELECTED+=("$p")
    done
else
    SELECTED=("${ALL[@]}")
fi
if [ -n "${GPU_SUITE_PYTHON:-}" ]; then PY=$GPU_SUITE_PYTHON
elif [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null 2>&1 || die "no Python '$PY' (set GPU_SUITE_PYTHON)"
# The parts run in the repository root: paths given relative to the caller's folder are made
# absolute (without resolving links: a virtual environment's python must keep its own path).
case "$PY" in */*) PY=$(realpath -ms -- "$PY") ;; esac
WHEELS=$(realpath -ms -- "$WHEELS")
OUTDIR_ABS=$(realpath -m -- "$OUTDIR")
EXPORT_ABS=""
if [ -n "$EXPORT" ]; then
    EXPORT_ABS=$(realpath -m -- "$EXPORT")
    case "$EXPORT_ABS/" in "$OUTDIR_ABS"/*) die "--export DIR must lie outside OUTDIR" ;; esac
    [ ! -e "$EXPORT_ABS" ] || [ -d "$EXPORT_ABS" ] || die "--export '$EXPORT' is not a folder"
fi
if [ "$DRY" = 0 ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || die "no CUDA device visible to $PY (the CPU rehearsal is --dry-run)"
fi
if [ -n "${GPU_SUITE_COMMIT:-}" ]; then COMMIT=$GPU_SUITE_COMMIT
elif COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
    git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || COMMIT="$COMMIT+dirty"
else COMMIT=unknown; fi

# ----------------------------------------------------------------------------- set-up
mkdir -p "$OUTDIR_ABS" || die "cannot make OUTDIR '$OUTDIR'"
[ -z "$EXPORT_ABS" ] || mkdir -p "$EXPORT_ABS" || die "cannot make --export '$EXPORT'"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# fastflow as installed: the package with kernels/ inside it as fastflow.kernels (pyproject's
# package-dir), built from symbolic links to the tree so it is always the current code.
mkdir -p "$WORK/src/fastflow" "$WORK/site"
for entry in "$ROOT"/fastflow/*; do
    [ "$(basename "$entry")" = __pycache__ ] || ln -s "$entry" "$WORK/src/fastflow/"
done
[ -e "$WORK/src/fastflow/kernels" ] || ln -s "$ROOT/kernels" "$WORK/src/fastflow/kernels"
# GPU_SUITE_COMMIT is exported below: in a copy of the tree without .git, the benches'
# common.git_commit() stamps every row with it.
export GPU_SUITE_DRY=$DRY GPU_SUITE_MODE=$MODE GPU_SUITE_WHEELS=$WHEELS GPU_SUITE_SITE=$WORK/site
export GPU_SUITE_COMMIT=$COMMIT OUTDIR=$OUTDIR_ABS PY
# PYTHONSAFEPATH: no script folder or working directory in front of sys.path, so the repository's
# fastflow/ (without kernels inside) never shadows the one above.
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONPATH="$WORK/src:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    RESERVE=2 MIN_START=2 GRACE=2 BENCH_MARGIN=2
else
    RESERVE=10 MIN_START=20 GRACE=5 BENCH_MARGIN=5
fi
export BENCH_MARGIN
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)

refresh() {
    printf 'mode\t%s\nbudget_s\t%s\nelapsed_s\t%s\nstarted\t%s\ncommit\t%s\n' \
        "$MODE" "$BUDGET" "$SECONDS" "$STARTED" "$COMMIT" >"$OUTDIR_ABS/suite.tsv"
    "$PY" "$ROOT/bench/gpu_summary.py" "$OUTDIR_ABS" >/dev/null 2>"$WORK/summary.err" \
        || cp "$WORK/summary.err" "$OUTDIR_ABS/summary.err"
    if [ -n "$EXPORT_ABS" ]; then
        [ -f "$OUTDIR_ABS/summary.md" ] && cp "$OUTDIR_ABS/summary.md" "$EXPORT_ABS/summary.md"
        tar -czf "$WORK/gpu-suite.tar.gz" -C "$(dirname "$OUTDIR_ABS")" "$(basename "$OUTDIR_ABS")" \
            && mv -f "$WORK/gpu-suite.tar.gz" "$EXPORT_ABS/gpu-suite.tar.gz"
    fi
}

echo "# gpu_suite: $MODE, budget ${BUDGET}s, parts: ${SELECTED[*]}"
echo "# output: $OUTDIR_ABS${EXPORT_ABS:+ (exported to $EXPORT_ABS)}; commit $COMMIT"
: >"$OUTDIR_ABS/parts.tsv"
refresh
unexpected=0
for name in "${SELECTED[@]}"; do
    limit=$(limit_of "$name")
    left=$((BUDGET - SECONDS - RESERVE))
    log="$name.log"
    if [ "$left" -lt "$MIN_START" ]; then
        status="skipped" rc="-" wall="0" limit="$((left > 0 ? left : 0))" log=""
    else
        [ "$limit" -le "$left" ] || limit=$left
        t0=$(date +%s.%N)
        GPU_SUITE_PART_LIMIT=$limit timeout -k "$GRACE" "$limit" bash "$SELF" --part "$name" \
            >"$OUTDIR_ABS/$log" 2>&1 </dev/null
        rc=$?
        t1=$(date +%s.%N)
        wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
        if [ "$rc" = 0 ]; then status="ok"
        elif [ "$rc" = 124 ] || { [ "$rc" = 137 ] && awk -v w="$wall" -v l="$limit" 'BEGIN {exit !(w >= l)}'; }; then
            status="timed out"
        else status="failed"; fi
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$wall" "$limit" "$log" >>"$OUTDIR_ABS/parts.tsv"
    printf '%-20s %-10s %7ss (limit %ss)\n' "$name" "$status" "$wall" "$limit"
    if [ "$status" = failed ] || [ "$status" = "timed out" ]; then
        [ -n "${EXPECTED[$name]:-}" ] || tail -n 5 "$OUTDIR_ABS/$log" | sed 's/^/    | /'
    fi
    [ "$status" = "${EXPECTED[$name]:-ok}" ] || unexpected=$((unexpected + 1))
    refresh
done
echo
cat "$OUTDIR_ABS/summary.md" 2>/dev/null || echo "(no summary: see $OUTDIR_ABS/summary.err)"
echo "# $((${#SELECTED[@]} - unexpected)) of ${#SELECTED[@]} parts as expected; results in $OUTDIR_ABS"
[ "$unexpected" = 0 ]
