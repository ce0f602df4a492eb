#!/usr/bin/env bash
# Runs every fedtune test: unit tests, end-to-end tests and doc examples of all
# crates. This is the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# The HumanEval harness runs generated programs with python3.
if ! command -v python3 >/dev/null 2>&1; then
    echo "tests/run.sh: installing python3 (HumanEval's sandbox runs it)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 >/dev/null
fi
cargo test --workspace -j 2 "$@"
