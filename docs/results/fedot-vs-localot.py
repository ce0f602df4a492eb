"""Collects the FedOT / LocalOT study's summaries (see fedot-vs-localot.sh)
into fedot-vs-localot.csv and draws fedot-vs-localot.svg: the full model's
held-out loss with each plugged-in adapter, against the model without one."""
import csv
import json
import os
import sys

runs, out = sys.argv[1], sys.argv[2]
rows = []
for drop in ("0.2", "0.5"):
    for align in ("0", "40"):
        for mode, scenario in (("fed", "FedOT"), ("local", "LocalOT")):
            with open(os.path.join(runs, f"{mode}-drop{drop}-align{align}", "summary.json")) as f:
                s = json.load(f)
            o = s["offsite"]
            d = o.get("distilled") or {}
            rows.append({
                "scenario": scenario,
                "drop_ratio": float(drop),
                "distill_steps": int(align),
                "kl_before": d.get("kl_before", ""),
                "kl_after": d.get("kl_after", ""),
                "emulator_loss_before": s["test_loss_before"],
                "emulator_loss_after": s["test_loss_after"],
                "full_model_loss_without_adapter": o["test_loss_full_model_base"],
                "full_model_loss_with_adapter": o["test_loss_full_model"],
                "bytes_up": s["bytes_up"],
                "wall_s": round(s["wall_s"], 1),
            })
with open(os.path.join(out, "fedot-vs-localot.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

# A bar per run: the full model's loss with the plugged-in adapter, as the
# change from the same model without an adapter (negative: it helped).
W, H, left, top, bottom = 640, 360, 70, 40, 70
deltas = [r["full_model_loss_with_adapter"] - r["full_model_loss_without_adapter"] for r in rows]
lo, hi = min(0.0, *deltas), max(0.0, *deltas)
span = (hi - lo) or 1.0
lo, hi = lo - 0.1 * span, hi + 0.1 * span
y = lambda v: top + (hi - v) / (hi - lo) * (H - top - bottom)
slot = (W - left - 20) / len(rows)
colour = {"FedOT": "#1f77b4", "LocalOT": "#ff7f0e"}
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">Full-model held-out loss change with the plugged-in adapter (Fed-GSM8K-3)</text>',
       f'<line x1="{left}" y1="{y(0)}" x2="{W - 20}" y2="{y(0)}" stroke="black"/>',
       f'<line x1="{left}" y1="{top}" x2="{left}" y2="{H - bottom}" stroke="black"/>']
for i in range(5):
    v = lo + (hi - lo) * i / 4
    svg.append(f'<text x="{left - 6}" y="{y(v) + 4}" text-anchor="end">{v:+.4f}</text>')
for i, (r, dv) in enumerate(zip(rows, deltas)):
    x = left + i * slot + slot * 0.15
    y0, y1 = sorted((y(0), y(dv)))
    svg.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{slot * 0.7:.1f}" height="{max(y1 - y0, 0.5):.1f}" fill="{colour[r["scenario"]]}"/>')
    label = f'{r["scenario"]}'
    sub = f'drop {r["drop_ratio"]}, ' + ("aligned" if r["distill_steps"] else "as built")
    cx = x + slot * 0.35
    svg.append(f'<text x="{cx:.1f}" y="{H - bottom + 16}" text-anchor="middle">{label}</text>')
    svg.append(f'<text x="{cx:.1f}" y="{H - bottom + 30}" text-anchor="middle" font-size="9">{sub}</text>')
svg.append(f'<text x="16" y="{(top + H - bottom) / 2}" transform="rotate(-90 16 {(top + H - bottom) / 2})" text-anchor="middle">loss with adapter − without</text>')
svg.append("</svg>")
with open(os.path.join(out, "fedot-vs-localot.svg"), "w") as f:
    f.write("\n".join(svg) + "\n")
for r in rows:
    print(r)
