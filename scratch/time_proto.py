"""Micro-timing: loss_and_grads of the prototype (one mixed-N stack) vs today's kernels."""
import sys, time
import torch
sys.path.insert(0, "scratch")
import proto_kernel as pk
import check_proto as cp
from modelscape import batched

def timeit(fn, reps):
    fn()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6

def stacks(width, param):
    over = {"DTYPE": "float32", "WIDTH": width, "PARAMETRIZATION": param, "CENTER": True}
    probs = cp.problems_for(over, {"ntrain": [64, 128, 256, 512], "trial": range(4)})
    for p in probs:  # d=5 in the harness; fine for timing the hidden layer
        pass
    return probs

for width, param in [(64, "sp"), (64, "mup"), (256, "mup")]:
    probs = stacks(width, param)
    names = [n for n, _ in probs[0].model.named_parameters()]
    t_new = timeit(lambda: cp.run_proto(probs), 20)
    # today's: one group per N
    old = 0.0
    for n in (64, 128, 256, 512):
        part = [p for p in probs if p.job.hp.N_SAMPLES == n]
        params = [torch.stack([dict(p.model.named_parameters())[nm].detach() for p in part]) for nm in names]
        X = torch.stack([p.X_tr for p in part]); y = torch.stack([p.y_tr for p in part]); f0 = torch.stack([p.f0_tr for p in part])
        if param == "sp":
            k = batched.MLPKernel(part[0].model, names, True)
            stack = batched.Stack(list(range(4)), params, {}, {}, {"gamma_b": None})
        else:
            k = batched.FuncKernel(part, names, True)
            stack = batched.Stack(list(range(4)), params, {}, {}, {"gamma_b": None, "gamma": torch.ones(4), **k.stacked_buffers(part)})
        old += timeit(lambda: k.loss_and_grads(stack, X, y, f0), 20)
    print(f"width {width} {param}: today (4 groups) {old:.0f} us/step, prototype (1 stack) {t_new:.0f} us/step")
