"""Collects the personalized-FL study's summaries (see pfl-dirichlet.sh)
into pfl-dirichlet.csv and draws pfl-dirichlet.svg: for each split, how far
Ditto's and pFedMe's mean client test loss (personal adapters) lies from
FedAvg's, with FedAvg's and the global (centralized) course's own values. (Wall times
are left out: the study shared its two cores with builds and tests.)"""
import csv
import json
import os
import sys

runs, out = sys.argv[1], sys.argv[2]
SPLITS = [("0.1", "α = 0.1"), ("0.5", "α = 0.5"), ("1", "α = 1"), ("10", "α = 10"), ("meta", "meta (1 language each)")]
ALGOS = [("global", "global (centralized)"), ("fedavg", "FedAvg"), ("ditto", "Ditto"), ("pfedme", "pFedMe")]
rows = []
missing = []
for split, _ in SPLITS:
    for algo, _ in ALGOS:
        path = os.path.join(runs, f"{split}-{algo}", "summary.json")
        if not os.path.exists(path):
            missing.append(f"{split}-{algo}")
            continue
        with open(path) as f:
            s = json.load(f)
        rows.append({
            "split": split,
            "algorithm": algo,
            "mean_client_test_loss_before": round(
                sum(c["test_loss_before"] for c in s["per_client"]) / len(s["per_client"]), 4),
            "mean_client_test_loss_after": round(s["mean_client_test_loss_after"], 4),
            "test_loss_after": round(s["test_loss_after"], 4),
            "bytes_up": s["bytes_up"],
        })
with open(os.path.join(out, "pfl-dirichlet.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

# One group per split: Ditto's and pFedMe's mean client loss minus
# FedAvg's (negative: personalization helped), FedAvg's and global's own
# values written under the group.
W, H, left, top, bottom = 720, 400, 70, 50, 110
PFL = [("ditto", "Ditto − FedAvg"), ("pfedme", "pFedMe − FedAvg")]
get = lambda split, algo: next((r["mean_client_test_loss_after"] for r in rows
                                if r["split"] == split and r["algorithm"] == algo), None)
deltas = [get(sp, a) - get(sp, "fedavg") for sp, _ in SPLITS for a, _ in PFL
          if get(sp, a) is not None and get(sp, "fedavg") is not None]
lo, hi = min(0.0, *deltas), max(0.0, *deltas)
span = (hi - lo) or 0.01
lo, hi = lo - 0.1 * span, hi + 0.1 * span
y = lambda v: top + (hi - v) / (hi - lo) * (H - top - bottom)
group = (W - left - 20) / len(SPLITS)
bar = group * 0.6 / len(PFL)
colour = {"ditto": "#2ca02c", "pfedme": "#d62728"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">Personalized minus FedAvg, mean client test loss (Fed-CodeAlpaca, 8 clients, 3 rounds)</text>',
       f'<text x="{W / 2}" y="34" text-anchor="middle">below zero: the personal adapters beat the shared one</text>',
       f'<line x1="{left}" y1="{top}" x2="{left}" y2="{H - bottom}" stroke="black"/>']
for i in range(5):
    v = lo + (hi - lo) * i / 4
    svg.append(f'<text x="{left - 6}" y="{y(v) + 4}" text-anchor="end">{v:+.3f}</text>')
    svg.append(f'<line x1="{left}" y1="{y(v)}" x2="{W - 20}" y2="{y(v)}" stroke="#ddd"/>')
svg.append(f'<line x1="{left}" y1="{y(0)}" x2="{W - 20}" y2="{y(0)}" stroke="black"/>')
for g, (split, label) in enumerate(SPLITS):
    x0 = left + g * group + group * 0.2
    fed = get(split, "fedavg")
    for a, (algo, _) in enumerate(PFL):
        v = get(split, algo)
        if v is None or fed is None:
            continue
        d = v - fed
        y0, y1 = sorted((y(0), y(d)))
        svg.append(f'<rect x="{x0 + a * bar:.1f}" y="{y0:.1f}" width="{bar * 0.9:.1f}" height="{max(y1 - y0, 0.5):.1f}" fill="{colour[algo]}"><title>{algo} {label}: {v} (FedAvg {fed})</title></rect>')
    cx = x0 + group * 0.3
    svg.append(f'<text x="{cx:.1f}" y="{H - bottom + 16}" text-anchor="middle">{label}</text>')
    if fed is not None:
        svg.append(f'<text x="{cx:.1f}" y="{H - bottom + 30}" text-anchor="middle" fill="#555">FedAvg {fed:.3f}</text>')
    glob = get(split, "global")
    if glob is not None:
        svg.append(f'<text x="{cx:.1f}" y="{H - bottom + 44}" text-anchor="middle" fill="#555">global {glob:.3f}</text>')
svg.append(f'<text x="{left + (W - left) / 2}" y="{H - bottom + 64}" text-anchor="middle">Dirichlet α over the programming language (smaller: more skewed), then the meta split</text>')
for a, (algo, label) in enumerate(PFL):
    x = left + 10 + a * 180
    svg.append(f'<rect x="{x}" y="{H - 22}" width="12" height="12" fill="{colour[algo]}"/>')
    svg.append(f'<text x="{x + 16}" y="{H - 12}">{label}</text>')
svg.append("</svg>")
with open(os.path.join(out, "pfl-dirichlet.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")
print(f"wrote {out}/pfl-dirichlet.csv and .svg ({len(rows)} runs)"
      + (f"; missing: {', '.join(missing)}" if missing else ""))
