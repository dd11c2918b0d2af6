import json, numpy as np
R = [json.load(open(f"scratch/logs/final-final_s{s}.json"))["results"][0] for s in (0, 1, 2)]
lp = json.load(open("scratch/logs/final-final_s0.json"))["linear_probe"]
lpm = float(np.mean(list(lp.values())))
def ms(k): v = [r[k] for r in R]; return np.mean(v), np.std(v), v
rows = []
def fmt(k, label, target, ok):
    m, s, v = ms(k); rows.append(f"| {label} | {target} | {m:.3f} ± {s:.3f} ({', '.join(f'{x:.3f}' for x in v)}) | {ok(m, v)} |")
zs = ms("zero_shot")[0]
fmt("experts", "experts", ">= .85", lambda m, v: "reached" if m >= .85 else "**not reached**")
fmt("zero_shot", "zero-shot", "[.30, .65]", lambda m, v: "reached" if .30 <= m <= .65 else "**not reached**")
em = ms("experts")[0]
rows.append(f"| linear probe / experts | >= .85 | {lpm:.3f} / {em:.3f} = {lpm/em:.3f} | {'reached' if lpm/em >= .85 else '**not reached**'} |")
ta = ms("ta")
rows.append(f"| task arithmetic, validated | >= zero-shot + .10 | {ta[0]:.3f} ± {ta[1]:.3f} ({', '.join(f'{x:.3f}' for x in ta[2])}); gain {ta[0]-zs:+.3f}; alpha {[r['ta_alpha'] for r in R]} (grid 0..1) | {'reached' if ta[0]-zs >= .10 else '**not reached**'} |")
fmt("ta_norm", "task arithmetic, normalized", ">= .70", lambda m, v: "reached" if m >= .70 else "**not reached**")
fmt("wa", "weight averaging", "above zero-shot, below TA", lambda m, v: "reached" if zs < m < ta[0] and all(w < t for w, t in zip(v, ta[2])) else "**not reached** (per seed: " + ", ".join(f"{w-t:+.3f}" for w, t in zip(v, ta[2])) + " vs TA)")
ts = ms("tsv")
rows.append(f"| TSV-M validated | >= TA + .03 | {ts[0]:.3f} ± {ts[1]:.3f} ({', '.join(f'{x:.3f}' for x in ts[2])}); TA {ts[0]-ta[0]:+.3f}; alpha {[r['tsv_alpha'] for r in R]} | {'reached' if ts[0]-ta[0] >= .03 else '**not reached**'} |")
fmt("tsvc_norm", "TSV-C normalized", ">= .97", lambda m, v: "reached" if m >= .97 else "**not reached**")
print("| quantity | target | mean ± std over seeds 0, 1, 2 (per seed) | status |\n|---|---|---|---|")
print("\n".join(rows))
tasks = list(R[0]["exp_test"])
print("\nper task (mean over seeds) | " + " | ".join(tasks))
for k in ("exp_test", "ta_test"):
    print(k, " | ".join(f"{np.mean([r[k][t] for r in R]):.3f}" for t in tasks))
print("rel", {t: round(float(np.mean([r["rel"][t] for r in R])), 4) for t in tasks})
print("expert wall", [r["expert_wall"] for r in R])
print("ta val", [r["ta_val_curve"] for r in R]); print("tsv val", [r["tsv_val_curve"] for r in R])
print("lp", lp, lpm)
