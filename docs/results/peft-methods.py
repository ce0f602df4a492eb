"""`fedtune bench peft --json` rows (see peft-methods.sh) as
peft-methods.csv and peft-methods.svg: three panels of horizontal bars —
bytes per client per round (log scale), seconds per step, peak memory."""
import csv
import json
import math
import os
import sys

rows = json.load(open(sys.argv[1]))
out = sys.argv[2]
with open(os.path.join(out, "peft-methods.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

panels = [
    ("bytes per client per round (f32, log)", "bytes_f32", True, lambda v: f"{v / 1e6:.2f} MB"),
    ("s per step (batch 4 × 128)", "median_step_s", False, lambda v: f"{v:.2f}"),
    ("peak RSS (MiB)", "peak_rss_mib", False, lambda v: f"{v:.0f}"),
]
label_w, panel_w, bar_h, top = 110, 200, 18, 50
W = label_w + len(panels) * (panel_w + 20) + 10
H = top + len(rows) * (bar_h + 6) + 20
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">PEFT methods on SmolLM2-135M (fedtune bench peft)</text>']
for i, r in enumerate(rows):
    y = top + i * (bar_h + 6)
    svg.append(f'<text x="{label_w - 6}" y="{y + bar_h - 5}" text-anchor="end">{r["method"]}</text>')
for p, (title, key, log, fmt) in enumerate(panels):
    x0 = label_w + p * (panel_w + 20)
    svg.append(f'<text x="{x0 + panel_w / 2}" y="{top - 10}" text-anchor="middle">{title}</text>')
    values = [r[key] or 0 for r in rows]
    if log:
        lo = math.log10(min(v for v in values if v > 0)) - 0.5
        hi = math.log10(max(values))
        length = lambda v: (math.log10(v) - lo) / (hi - lo) * (panel_w - 60) if v > 0 else 0
    else:
        length = lambda v: v / max(values) * (panel_w - 60)
    for i, v in enumerate(values):
        y = top + i * (bar_h + 6)
        L = length(v)
        svg.append(f'<rect x="{x0}" y="{y}" width="{L:.1f}" height="{bar_h}" fill="#4c78a8"/>')
        svg.append(f'<text x="{x0 + L + 4:.1f}" y="{y + bar_h - 5}">{fmt(v)}</text>')
svg.append("</svg>")
with open(os.path.join(out, "peft-methods.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")
for r in rows:
    print(r)
