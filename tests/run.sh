#!/usr/bin/env bash
# Runs every fedtune test: unit tests, end-to-end tests and doc examples of all
# crates. This is the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace -j 2 "$@"
