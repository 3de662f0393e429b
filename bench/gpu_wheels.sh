#!/usr/bin/env bash
# Downloads the wheels bench/gpu_suite.sh installs on a GPU machine that has no network and lacks
# packages fastflow needs (diffusers, peft), for CPython 3.12 on manylinux x86-64, into an ignored
# folder (default bench/.gpu_wheels), and checks that they and the working tree fit the 64 MiB
# that may travel with one run.
#
#   bash bench/gpu_wheels.sh                       # diffusers, peft, transformers and diffusers' missing needs
#   bash bench/gpu_wheels.sh --with-bitsandbytes   # also bitsandbytes (~41 MiB; nothing in the suite uses it)
#   bash bench/gpu_wheels.sh --no-transformers     # keep the image's own transformers
#   bash bench/gpu_wheels.sh --dest DIR --limit-mib 64
#
# Run it on a machine with access to the package registries. Versions come from constraints.txt
# where it pins the package. transformers is there, but at another version than the pin: its
# wheel (~13 MiB) makes peft and diffusers run with the transformers the CPU suite tests them
# with. Everything else the suite imports (torch, triton, accelerate, huggingface-hub,
# safetensors, tokenizers, pytest, pytest-timeout) is taken from the GPU machine's own image and
# never reinstalled: the wheels are installed with --no-deps.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/bench/.gpu_wheels"
LIMIT_MIB=64
WITH_BNB=0
WITH_TRANSFORMERS=1
PY=${GPU_WHEELS_PYTHON:-}

die() { echo "gpu_wheels.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dest) [ $# -ge 2 ] || die "--dest needs a folder"; DEST=$2; shift 2 ;;
        --limit-mib) [ $# -ge 2 ] || die "--limit-mib needs a number"; LIMIT_MIB=$2; shift 2 ;;
        --with-bitsandbytes) WITH_BNB=1; shift ;;
        --no-transformers) WITH_TRANSFORMERS=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$LIMIT_MIB" =~ ^[0-9]+$ ]] || die "--limit-mib must be a whole number of MiB, got '$LIMIT_MIB'"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
"$PY" -m pip --version >/dev/null 2>&1 || die "no pip for '$PY' (set GPU_WHEELS_PYTHON)"

# The version constraints.txt pins for a package ('' when it pins none).
pin() { sed -n "s/^$1==\([^[:space:]#]*\).*/\1/p" "$ROOT/constraints.txt" | head -1; }

# name==version, one per wheel. diffusers and peft follow constraints.txt; importlib_metadata and
# lazy-importer are diffusers' declared needs that the GPU image lacks (Python 3.12's
# importlib.metadata is what diffusers imports there; they make the set complete), pinned to what
# the development environment resolves.
SPECS=()
PINNED=(diffusers peft)
[ "$WITH_TRANSFORMERS" = 0 ] || PINNED+=(transformers)
for name in "${PINNED[@]}"; do
    v=$(pin "$name")
    [ -n "$v" ] || die "constraints.txt pins no version of $name"
    SPECS+=("$name==$v")
done
SPECS+=("importlib_metadata==10.2.0" "lazy-importer==0.1.0")
if [ "$WITH_BNB" = 1 ]; then
    v=$(pin bitsandbytes)
    [ -n "$v" ] || die "constraints.txt pins no version of bitsandbytes"
    SPECS+=("bitsandbytes==$v")
fi

# pip matches manylinux_2_N exactly: list the tags the wheels we need are published under
# (bitsandbytes: 2_24) and that the GPU image's glibc accepts.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
plat_args=()
for p in "${PLATFORMS[@]}"; do plat_args+=(--platform "$p"); done

# Download into a fresh folder and swap it in: two versions of one package stop the install.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/gpu_wheels.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "# downloading ${SPECS[*]} (CPython 3.12, manylinux x86-64)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${plat_args[@]}" -d "$TMP" "${SPECS[@]}"
n_got=$(find "$TMP" -maxdepth 1 -name '*.whl' | wc -l)
[ "$n_got" -eq "${#SPECS[@]}" ] || die "expected ${#SPECS[@]} wheels, got $n_got"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$TMP" "$DEST"
trap - EXIT
chmod 755 "$DEST"
case "$DEST/" in
    "$ROOT"/*) git -C "$ROOT" check-ignore -q "$DEST" \
        || echo "# note: ${DEST#$ROOT/} is not ignored by git: it travels as untracked files without being carried" ;;
    *) echo "# note: $DEST lies outside the repository: copy it into the tree (an ignored folder) to carry it" ;;
esac

# What travels with a run: tracked files, untracked files git does not ignore, shared/, and the
# carried wheel folder. Sizes in bytes; the limit is on their sum.
cd "$ROOT"
tree_bytes=$(
    { git ls-files -z --cached --others --exclude-standard; \
      if [ -d shared ]; then find shared -type f -print0; fi; } 2>/dev/null \
    | sort -zu | grep -zv "^${DEST#$ROOT/}/" \
    | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
wheel_bytes=$(find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
limit_bytes=$((LIMIT_MIB * 1024 * 1024))
total=$((tree_bytes + wheel_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.2f", b / 1048576}'; }

echo "# wheels in ${DEST#$ROOT/}:"
find "$DEST" -maxdepth 1 -name '*.whl' -printf '%s %f\n' | sort -rn \
    | while read -r size file; do printf '  %8s MiB  %s\n' "$(mib "$size")" "$file"; done
[ "$WITH_BNB" = 1 ] || echo "  left out: bitsandbytes (~41 MiB; no part of the GPU suite uses it; --with-bitsandbytes adds it)"
printf '# wheels %s MiB + working tree %s MiB = %s MiB of %s MiB (%s MiB to spare)\n' \
    "$(mib "$wheel_bytes")" "$(mib "$tree_bytes")" "$(mib "$total")" "$LIMIT_MIB" \
    "$(mib $((limit_bytes - total)))"
if [ "$total" -gt "$limit_bytes" ]; then
    echo "gpu_wheels.sh: over the ${LIMIT_MIB} MiB limit by $(mib $((total - limit_bytes))) MiB: drop --with-bitsandbytes (or add --no-transformers) or shrink the working tree" >&2
    exit 1
fi
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || commit="$commit+dirty"
wheels_arg=""
[ "$DEST" = "$ROOT/bench/.gpu_wheels" ] || wheels_arg=" --wheels ${DEST#$ROOT/}"
echo "# on the GPU machine, from the repository root, with ${DEST#$ROOT/} copied along:"
echo "  GPU_SUITE_COMMIT=$commit bash bench/gpu_suite.sh /tmp/gpu-suite --export \$OUT$wheels_arg"
