#!/usr/bin/env bash
# Run every test: each package in an environment holding only that package, its declared
# dependencies and its test group (so importing an undeclared neighbour fails), with its
# slim-install check (tools/slim_install.py: the environment holds no undeclared workspace
# package, and the package's main entry point works there), then the integration tests in
# the full workspace environment.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
pytest_ok() { # pytest exits 5 when a folder holds no tests yet; that is not a failure here
  local rc=0
  uv run --frozen --no-sync pytest "$@" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ]
}
for pkg in vq-core vq-kernels vq-algorithms vq-calibrate vq-mlxlm; do
  echo "== $pkg (isolated environment)"
  uv sync --frozen --quiet --package "$pkg" --no-default-groups --group test
  pytest_ok "packages/$pkg"
  uv run --frozen --no-sync python tools/slim_install.py "$pkg"
done
echo "== integration (full workspace)"
uv sync --frozen --quiet
pytest_ok tests-integration --durations=15
