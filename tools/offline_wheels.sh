#!/usr/bin/env bash
# Wheels for a GPU machine without network: run here (network, the project's torch installed),
# copy the repository with .whl/ to the GPU machine, install with the line this script prints.
#
#   bash tools/offline_wheels.sh                                   # Python 3.12, manylinux x86_64
#   bash tools/offline_wheels.sh --python 3.11 --platform manylinux_2_28_aarch64
#   bash tools/offline_wheels.sh --out /tmp/wheels some-extra-package
#
# 1. deepspeed, the version installed here, as a pure-Python wheel (DS_BUILD_OPS=0: no CUDA ops
#    compiled; embedtrain uses none, and ops DeepSpeed needs later are JIT-built on first use).
#    --no-build-isolation because deepspeed's setup.py imports torch: the installed one is used.
# 2. the packages a GPU image with torch and transformers may lack (the versions installed here
#    when there are, so pydantic and pydantic-core stay a matching pair), for the target Python and
#    platform. pydantic-core and xxhash are compiled: their wheels must match the GPU machine.
# Everything goes to .whl/ (git-ignored). --no-deps: dependencies are exactly this list.
set -euo pipefail

PYTHON_VERSION=3.12
PLATFORM=x86_64
OUT=.whl
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON_VERSION="$2"; shift 2 ;;
    --platform) PLATFORM="$2"; shift 2 ;;   # an architecture (x86_64, aarch64) or one manylinux tag
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "offline_wheels.sh: unknown option $1" >&2; exit 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PY:-python}

# pip takes several --platform tags; a bare architecture means every common manylinux tag of it.
case "$PLATFORM" in
  x86_64|aarch64)
    PLATFORMS=(manylinux2014_"$PLATFORM" manylinux_2_17_"$PLATFORM" manylinux_2_28_"$PLATFORM"
               manylinux_2_34_"$PLATFORM" linux_"$PLATFORM") ;;
  *) PLATFORMS=("$PLATFORM") ;;
esac
PLATFORM_ARGS=()
for tag in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$tag"); done
ABI="cp${PYTHON_VERSION/./}"

installed() {  # "name==version" when installed here, else "name"
  "$PY" - "$1" <<'EOF'
import sys
from importlib import metadata
try:
    print(f"{sys.argv[1]}=={metadata.version(sys.argv[1])}")
except metadata.PackageNotFoundError:
    print(sys.argv[1])
EOF
}

DS_VERSION=$("$PY" -c "from importlib.metadata import version; print(version('deepspeed'))" 2>/dev/null || true)
if [ -z "$DS_VERSION" ]; then
  echo "offline_wheels.sh: deepspeed is not installed here: install the project first (README.md)" >&2
  exit 1
fi
"$PY" -c "import torch" 2>/dev/null || {
  echo "offline_wheels.sh: torch is not importable: deepspeed's setup.py needs it (--no-build-isolation)" >&2
  exit 1
}

echo "== deepspeed==$DS_VERSION, pure Python (DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$OUT" "deepspeed==$DS_VERSION"

PACKAGES=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess xxhash \
            pytest-xdist execnet \
            liger-kernel ${EXTRA[@]+"${EXTRA[@]}"}; do
  PACKAGES+=("$(installed "$name")")
done
echo "== for Python $PYTHON_VERSION on ${PLATFORMS[*]}: ${PACKAGES[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: -d "$OUT" --python-version "$PYTHON_VERSION" \
  --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORM_ARGS[@]}" "${PACKAGES[@]}"

echo
ls -1 "$OUT"/*.whl
echo
echo "On the GPU machine, from the repository root (with $OUT/ copied along):"
echo "  pip install --no-index --no-deps --target /tmp/site $OUT/*.whl && export PYTHONPATH=/tmp/site:\$PWD DS_BUILD_OPS=0"
