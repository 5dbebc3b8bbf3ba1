#!/usr/bin/env bash
# ruff and mypy --strict on the package. mypy cannot follow the editable install's import hook
# (the repository's folders are mapped to rmserve.*, see pyproject.toml), so it reads the
# package through a view of symlinks laid out as installed.
set -euo pipefail
cd "$(dirname "$0")/.."
view=build/typecheck
rm -rf "$view" && mkdir -p "$view/rmserve"
for folder in wire web sandbox models service examples; do
  ln -s "../../../$folder" "$view/rmserve/$folder"
done
ln -s ../../../client/src/rmserve/client "$view/rmserve/client"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
cd "$view" && ../../.venv/bin/mypy --config-file ../../pyproject.toml \
  -p rmserve.wire -p rmserve.web -p rmserve.sandbox -p rmserve.models -p rmserve.service \
  -p rmserve.client -p rmserve.examples
