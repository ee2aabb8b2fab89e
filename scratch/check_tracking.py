import math, sys
import numpy as np, torch
XP = np if sys.argv[1] == 'np' else torch
conv = (lambda a: np.asarray(a)) if XP is np else (lambda a: torch.as_tensor(np.asarray(a)))
sys.path.insert(0, "scratch")
from proto_tracking import scan

def oracle(losses, s, thresholds, max_iter):
    thresholds = sorted(thresholds, reverse=True)
    timekeys = np.full(len(thresholds), np.nan); crossed = 0; ema = math.nan
    exit_step, diverged, trail = None, False, []
    for step, value in enumerate(losses):
        if not math.isfinite(value):
            exit_step, diverged = step, True; break
        ema = value if step == 0 else s * ema + (1 - s) * value
        trail.append(ema)
        while crossed < len(thresholds) and ema < thresholds[crossed]:
            timekeys[crossed] = step; crossed += 1
        if crossed == len(thresholds) or step == max_iter - 1:
            exit_step = step; break
    return ema, timekeys, exit_step, diverged, trail

rng = np.random.default_rng(1)
R, T, K = 64, 150, 3
L = np.exp(-rng.uniform(0.002, 0.06, (R, 1)) * np.arange(T)) * rng.uniform(0.7, 1.4, (R, T))
L = L.astype(np.float32)
for r in range(0, R, 7): L[r, rng.integers(0, T)] = np.nan
L[3, 0] = np.inf
S = rng.choice([0.0, 0.5, 0.9, 0.99], R)
MI = rng.choice([40, 100, 150], R)
TH = np.sort(rng.uniform(0.05, 0.7, (R, K)), 1)[:, ::-1].copy()
ema = torch.full((R,), float("nan"), dtype=torch.float64)
tk = torch.full((R, K), float("nan"), dtype=torch.float64)
exits = np.full(R, -1); div = np.zeros(R, bool); trails = np.full((R, T), np.nan)
live = np.arange(R)
for t0 in range(0, T, 32):
    live = np.array([r for r in range(R) if exits[r] < 0])
    if not len(live): break
    out = scan(XP, t0, conv(L[live, t0:t0+32]), conv(ema[live].numpy()), conv(tk[live].numpy()), conv(TH[live]),
               conv(S[live]), conv(MI[live] - 1.0), True)
    out = torch.as_tensor(out)
    W = min(32, T - t0)
    for j, r in enumerate(live):
        tk[r] = out[j, :K]; e = out[j, K].item(); exits[r] = int(e); div[r] = bool(out[j, K+1]); ema[r] = out[j, K+2]
        trails[r, t0:t0+W] = out[j, K+3:K+3+W].numpy()
bad = 0
for r in range(R):
    e, tks, ex, dv, tr = oracle([float(v) for v in L[r]], S[r], list(TH[r]), MI[r])
    ok = (ex == exits[r]) and (dv == div[r]) and np.array_equal(tks, tk[r].numpy(), equal_nan=True) \
        and (dv or e == ema[r].item() or (math.isnan(e) and math.isnan(ema[r].item()))) \
        and np.array_equal(np.array(tr), trails[r, :len(tr)])
    if not ok:
        bad += 1; print(r, ex, exits[r], dv, div[r], tks, tk[r], e, ema[r].item())
print("mismatches", bad, "exits", sorted(set(exits)))
