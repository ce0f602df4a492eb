#!/usr/bin/env bash
# FS-LLM's Table 4 on the default model: what each PEFT method costs —
# trainable parameters, bytes one client sends per round (f32, and int8 +
# DEFLATE), seconds per training step (batch 4 x 128 tokens, AdamW; the
# median of 11 timed steps after one warm-up) and peak memory, each method
# in a process of its own. Writes peft-methods.csv and .svg beside this script.
#
#   cargo build --release && bash docs/results/peft-methods.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
F=${FEDTUNE:-target/release/fedtune}
mkdir -p runs
"$F" bench peft --json --steps 11 \
    --methods lora,prompt,p-tuning,prefix,fedot-0.2,fedot-0.5,fedot-full-0.2,fedot-full-0.5 \
    > runs/peft-methods.json
python3 docs/results/peft-methods.py runs/peft-methods.json docs/results
