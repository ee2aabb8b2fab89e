"""Does torch.compile of the stacked step pay on this CPU? (prototype kernel, width 64)"""
import sys, time
import torch
sys.path.insert(0, "scratch")
import proto_kernel as pk
import check_proto as cp

over = {"DTYPE": "float32", "WIDTH": int(sys.argv[1]), "PARAMETRIZATION": "mup", "CENTER": True}
probs = cp.problems_for(over, {"ntrain": [64, 128, 256, 512], "trial": range(4)})
names = [n for n, _ in probs[0].model.named_parameters()]
kernel = pk.MLPKernel(probs[0].model, names)
layout = pk.Layout([p.job.hp.N_SAMPLES for p in probs], [True] * len(probs))
params = [torch.stack([dict(p.model.named_parameters())[n].detach() for p in probs]) for n in names]
gammas = torch.tensor([p.gamma for p in probs])
fac = kernel.factors([p.model for p in probs], gammas, layout, 1)
X = torch.cat([p.X_tr for p in probs]); y = torch.cat([p.y_tr for p in probs]); f0 = torch.cat([p.f0_tr for p in probs])
lr = 0.01

def step(params):
    losses, grads = kernel.loss_and_grads(params, X, y, f0, layout, fac)
    torch._foreach_sub_(params, torch._foreach_mul(grads, lr))
    return losses

def bench(fn, reps=50):
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps): fn(params)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6

eager = bench(step)
t = time.perf_counter()
compiled = torch.compile(step, dynamic=False)
compiled(params)
ct = time.perf_counter() - t
comp = bench(compiled)
eager2 = bench(step)
print(f"width {sys.argv[1]}: eager {min(eager, eager2):.0f} us/step, compiled {comp:.0f} us/step, compile {ct:.1f} s")
