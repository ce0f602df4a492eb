#!/usr/bin/env bash
# Runs every fedtune test: unit tests, end-to-end tests and doc examples of all
# crates. This is the README's test command, and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the tests run besides cargo: python3 (HumanEval's sandbox),
# nats-server (the NATS transport's tests start their own on a free port),
# openssl (the TLS test makes its own certificates) and Chromium with
# chromedriver (the live view's test loads the page in a headless browser).
missing=()
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
# The live view's browser test drives Chromium through chromedriver.
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]} (Debian packages)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Here the browser test must find a browser, not skip.
export FEDTUNE_REQUIRE_BROWSER=1
cargo test --workspace -j 2 "$@"
# The narrower SIMD paths a CPU without AVX-512 (avx2) or without AVX2
# (scalar) takes: the kernels' value-and-gradient tests and the training
# step on each, whatever this machine has.
for path in avx2 scalar; do
    FEDTUNE_SIMD=$path cargo test -p fedtune-adapters -j 2 --lib --test training "$@"
done
# The composite candle ops every device but the CPU runs (a GPU's math):
# the same tests with the fused kernels off, except the kernels' own, which
# compare the two paths and need both.
FEDTUNE_KERNELS=composite cargo test -p fedtune-adapters -j 2 --lib --test training "$@" \
    -- --skip kernels::tests
