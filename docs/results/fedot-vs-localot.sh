#!/usr/bin/env bash
# FS-LLM's Table 5 at this machine's scale: federated offsite-tuning (FedOT)
# against each client tuning the emulator alone (LocalOT), at drop ratios
# 0.2 and 0.5, with the emulator used as built and aligned by distillation
# first. Fed-GSM8K-3 (3 clients), LoRA in the 2 + 2 adapter layers of
# SmolLM2-135M, 2 rounds x 5 local steps (LocalOT: the same 10 steps per
# client), 16 test examples per client. Writes fedot-vs-localot.csv and
# .svg beside this script; the runs go to $OUT (default runs/study-fedot).
#
#   cargo build --release && bash docs/results/fedot-vs-localot.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
F=${FEDTUNE:-target/release/fedtune}
OUT=${OUT:-runs/study-fedot}
BUDGET=(--set federate.rounds=2 --set train.local_steps=5 --set data.eval_limit=16
        --set federate.eval_every=2 --quiet --overwrite)
for drop in 0.2 0.5; do
    for align in 0 40; do
        ALIGN=()
        if [ "$align" -gt 0 ]; then
            # Aligned once per drop ratio, then reused by the other scenario.
            ALIGN=(--set offsite.distill_steps=$align --set offsite.distill_lr=1e-3
                   --set "offsite.emulator_path=\"$OUT/emulator-$drop\"")
        fi
        for mode in fed local; do
            name=$mode-drop$drop-align$align
            echo "== $name" >&2
            "$F" run configs/fed-gsm8k-3-fedot.toml --out "$OUT/$name" "${BUDGET[@]}" \
                --set offsite.drop_ratio=$drop --set "federate.mode=\"$mode\"" "${ALIGN[@]}"
        done
    done
done
python3 docs/results/fedot-vs-localot.py "$OUT" docs/results
