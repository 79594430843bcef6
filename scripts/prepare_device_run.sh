#!/usr/bin/env bash
# Prepares this checkout for scripts/gpu_check.sh on a lent GPU machine, which has no network:
#   - .whl/: the wheels its python3 (3.12, torch, transformers, typer, rich) lacks, at the
#     versions of this checkout's .venv, for CPython 3.12 on x86-64 Linux;
#   - shared/bench/workloads: the benchmark workloads (only a shared/ inside the checkout travels).
# Then: run `scripts/gpu_check.sh` there with carry [".whl"] (shared/ travels by itself).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection typing-extensions
  python-dotenv sqlalchemy alembic mako
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
  manylinux1_x86_64)
PY="${PYTHON:-.venv/bin/python}"

rm -rf .whl && mkdir -p .whl
for package in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$package")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "$package==$version" 2> >(grep -v "is ignored" >&2)
done
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"

if [[ -d ../shared/bench/workloads ]]; then
  mkdir -p shared/bench && rm -rf shared/bench/workloads && cp -r ../shared/bench/workloads shared/bench/
  echo "workloads: $(ls shared/bench/workloads | tr '\n' ' ')"
else
  echo "no ../shared/bench/workloads beside the checkout: the probe-strategy table will be skipped" >&2
fi
