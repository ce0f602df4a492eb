#!/usr/bin/env bash
# FS-LLM's Figure 5a at this machine's scale: FedAvg against the personalized
# pFedMe and Ditto on Fed-CodeAlpaca (8 clients), as the clients' data grow
# more alike — Dirichlet label skew over the programming language with
# alpha 0.1, 0.5, 1 and 10, and the meta split (one language per client) —
# with the centralized (global) course on the same budget as the reference.
# Every course: LoRA r 8 on q/v, 3 rounds x 4 local steps (global: 32 steps
# a round), sequences cut at 128 tokens, 16 test examples per client, seed
# 42. The score is the mean over clients of their test loss (each with its
# personal adapter under pFedMe and Ditto). Writes pfl-dirichlet.csv and
# .svg beside this script; the runs go to $OUT (default runs/study-pfl).
#
#   cargo build --release && bash docs/results/pfl-dirichlet.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
F=${FEDTUNE:-target/release/fedtune}
OUT=${OUT:-runs/study-pfl}
BUDGET=(--set federate.rounds=3 --set train.local_steps=4 --set federate.eval_every=3
        --set data.eval_limit=16 --set data.max_tokens=128 --quiet --overwrite)
PFL=(--set pfl.lambda=0.1 --set pfl.eta=1.0 --set pfl.inner_steps=2)
for split in meta 0.1 0.5 1 10; do
    if [ "$split" = meta ]; then
        SPLIT=(configs/fed-codealpaca-lora.toml)
    else
        SPLIT=(configs/fed-codealpaca-dir-lora.toml --set data.alpha=$split)
    fi
    for algo in fedavg ditto pfedme global; do
        case $algo in
            fedavg) ALGO=() ;;
            global) ALGO=(--set 'federate.mode="global"') ;;
            *) ALGO=(--set "pfl.algorithm=\"$algo\"") ;;
        esac
        name=$split-$algo
        if [ -f "$OUT/$name/summary.json" ]; then continue; fi
        echo "== $name" >&2
        "$F" run "${SPLIT[@]}" --out "$OUT/$name" "${BUDGET[@]}" "${PFL[@]}" "${ALGO[@]}"
    done
done
python3 docs/results/pfl-dirichlet.py "$OUT" docs/results
