#!/usr/bin/env bash
# Prints one hash of everything the compiled library is built from (csrc/, CMakeLists.txt,
# pyproject.toml: paths and contents), so that a library built on one machine can be matched to
# the tree on another without git. bench/prepare_gpu_lease.sh records it beside the library it
# builds; bench/gpu_suite.sh uses that library only when the tree still hashes the same.
set -euo pipefail
cd "$(dirname "$0")/.."
{ find csrc -type f; echo CMakeLists.txt; echo pyproject.toml; } | LC_ALL=C sort | xargs sha256sum \
    | sha256sum | cut -d' ' -f1
