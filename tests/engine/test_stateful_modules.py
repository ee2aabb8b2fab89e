"""Dropout and BatchNorm inside stacks (``engine.stateful``): each job's masks come from its own
stream, keyed by its seed and its own step, and its BatchNorm statistics are its own.

Every stacked job must equal its one-job run to float rounding (timekeys exactly), whether it
exits inside a window (the window is replayed), joins a running stack at another step (refill)
or resumes from a checkpoint. Grabs read the running statistics, so the curves compare them.
"""

import warnings

import pytest
import torch
from sweeps import assert_same, quadratic_bfn, reference
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from modelscape import engine
from modelscape.engine.stacked.batching import batched_operations
from modelscape.runner import plan
from modelscape.store.checkpoints import Checkpoints

CPU = torch.device("cpu")

BASE = {
    "WIDTH": 12,
    "N_SAMPLES": 16,
    "N_TEST": 50,
    "MAX_ITER": 300,
    "OPTIMIZER": "Adam",
    "LOSS_CHECKPOINTS": [0.9, 0.5],
    "ONLINE": True,
    "DTYPE": "float64",
    "DEVICES": ["cpu"],
}
AXES = {"trial": range(3), "LR": [0.003, 0.01, 0.03]}


class DropoutNet(nn.Module):
    """Two Dropout modules: a step's masks are drawn in the order the forward pass calls them."""

    def __init__(self, d_in, d_out, width, dropout=0.3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Dropout(dropout))
        self.mid = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout / 2))
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        return self.head(self.mid(self.body(x)))


class NormNet(nn.Module):
    def __init__(self, d_in, d_out, width):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.ReLU())
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        return self.head(self.body(x))


class NormCNN(nn.Module):
    """conv-BN-ReLU twice (BatchNorm2d), then a linear readout."""

    def __init__(self, in_shape, d_out, width):
        super().__init__()
        c = in_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(4 * in_shape[1] * in_shape[2], d_out)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class AlphaNet(NormNet):
    def __init__(self, d_in, d_out, width):
        super().__init__(d_in, d_out, width)
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.AlphaDropout(0.2))


# relative tolerances: Dropout's numbers are the one-job loop's but for the order of a few sums;
# batch statistics under vmap round differently, and running statistics carry it over steps
TOL = {DropoutNet: 1e-9, NormNet: 1e-6}


def image_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 2, 4, 4, generator=gen)
        return Xb, Xb[:, 0, :2, :2].mean((1, 2)) * Xb[:, 1, 2:, 2:].mean((1, 2)) * 4

    return batch_fn


def sequence_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, 3, generator=gen)
        return Xb, Xb[:, :, 0].mean(1) * Xb[:, :, 1].mean(1) * 4

    return batch_fn


def running_stats(model, **kwargs):
    """Every BatchNorm's running mean and variance, as a grab: the curves compare them."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in bns])


def make_jobs(bfn=quadratic_bfn, **overrides):
    config = {**BASE, **overrides}
    _, _, jobs, spec = plan(list(AXES.values()), list(AXES), config, {"base_bfn": bfn})
    return jobs, spec


def stacked(jobs, spec, checkpoints=None, width=None):
    (group,) = engine.group_jobs(jobs, spec=spec)
    assert engine.can_batch(group)
    out = {}
    for record in engine.train_stacked(group, spec, CPU, checkpoints, width=width):
        assert record.trained_by == "stacked", (record.trained_by, record.error)
        out[record.key] = record
    return out


def assert_replayed(records, max_iter):
    """The jobs exit at several steps, inside windows: the windows were replayed for them."""
    exits = {r.steps for r in records.values() if 1 < r.steps < max_iter}
    assert len(exits) >= 2, exits


@pytest.mark.parametrize(
    "overrides",
    [{}, {"ONLINE": False, "N_SAMPLES": 24}, {"CENTER": False, "ONLYTHRESHOLDS": False}],
    ids=["online-centered", "offline", "online-curves"],
)
def test_a_stacked_job_with_dropout_equals_its_one_job_run(overrides):
    jobs, spec = make_jobs(MODEL_CLASS=DropoutNet, LOSS_CHECKPOINTS=[0.9, 0.7], **overrides)
    ref = reference(jobs, spec)
    assert_replayed(ref, BASE["MAX_ITER"])
    assert_same(ref, stacked(jobs, spec), tol=1e-9)


class CausalAttention(nn.Module):
    """A user's attention: ``F.scaled_dot_product_attention`` with a causal mask, two heads."""

    def __init__(self, in_shape, d_out, width):
        super().__init__()
        self.qkv = nn.Linear(in_shape[1], 3 * width)
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (a.view(n, t, 2, -1).transpose(1, 2) for a in self.qkv(x).chunk(3, -1))
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(h.transpose(1, 2).reshape(n, t, -1)[:, -1])


def stacked_without_per_job_fallback(jobs, spec):
    """``stacked``, asserting that no operation fell back to a per-job loop inside ``vmap``
    (torch warns "we have not yet implemented the batching rule" when one does)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stacked(jobs, spec)
    fallbacks = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert not fallbacks, fallbacks[0]
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_builtin_transformer_stacks_with_batched_attention_and_equals_its_one_job_run(dtype):
    """Its Dropout modules (p=0) draw nothing; its attention runs batched over the stack (the
    math backend), not once per job; a one-job run uses torch's fused attention."""
    jobs, spec = make_jobs(
        sequence_bfn, MODEL_CLASS="Transformer", WIDTH=8, DEPTH=1, MAX_ITER=40, DTYPE=dtype
    )
    tol = 1e-9 if dtype == "float64" else 1e-4
    assert_same(reference(jobs, spec), stacked_without_per_job_fallback(jobs, spec), tol=tol)


def test_a_stacked_transformer_runs_its_self_attention_without_torchs_copies_and_checks():
    """``batching._self_attention`` runs (no math-backend attention, whose fully-masked-row
    checks it skips), each (sample, head) a softmax of the stacked products."""
    jobs, spec = make_jobs(sequence_bfn, MODEL_CLASS="Transformer", WIDTH=8, DEPTH=1, MAX_ITER=3)
    with _Calls("_safe_softmax", "_softmax", "_scaled_dot_product_attention_math") as calls:
        stacked(jobs, spec)
    names = {name for name, _ in calls.calls}
    assert names == {"_softmax"}, names
    jobs_, n, heads, length = len(jobs), BASE["N_SAMPLES"], 4, 4  # sequences of 4 tokens
    assert (jobs_, n, heads, length, length) in {shapes[0] for _, shapes in calls.calls}


@pytest.mark.parametrize(
    "options",
    [{}, {"attn_mask": "causal"}, {"need_weights": True}, {"bias": False}, {"key_padding": True}],
    ids=["plain", "masked", "weights", "no-bias", "padding"],
)
def test_stacked_self_attention_equals_torchs_for_each_job(options):
    """Outputs and gradients of a vmapped ``nn.MultiheadAttention`` under ``batched_operations``
    equal each job's own call, whether ``_self_attention`` or torch's code (masks, weights)
    computes them."""
    jobs, n, length, width = 3, 4, 5, 8
    mha = nn.MultiheadAttention(
        width, 2, batch_first=True, bias=options.get("bias", True), dtype=torch.float64
    )
    names = [name for name, _ in mha.named_parameters()]
    params = [torch.randn(jobs, *p.shape, dtype=torch.float64) for p in mha.parameters()]
    x = torch.randn(jobs, n, length, width, dtype=torch.float64)
    kwargs = {"need_weights": options.get("need_weights", False)}
    if "attn_mask" in options:
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length).double()
    if "key_padding" in options:
        kwargs["key_padding_mask"] = torch.arange(length).expand(n, length) >= length - 1

    def one(ps, xj):
        return torch.func.functional_call(mha, dict(zip(names, ps)), (xj, xj, xj), kwargs)[0]

    leaves = [p.clone().requires_grad_() for p in params]
    with batched_operations(norms=False, attention=True):
        out = torch.func.vmap(one)(leaves, x)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    for j in range(jobs):
        own = [p[j].clone().requires_grad_() for p in params]
        ref = one(own, x[j])
        ref_grads = torch.autograd.grad(ref.square().sum(), own)
        torch.testing.assert_close(out[j], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close([g[j] for g in grads], list(ref_grads), rtol=1e-10, atol=1e-10)


def test_a_users_causal_attention_stacks_and_equals_its_one_job_run():
    jobs, spec = make_jobs(sequence_bfn, MODEL_CLASS=CausalAttention, WIDTH=8, MAX_ITER=40)
    assert_same(reference(jobs, spec), stacked_without_per_job_fallback(jobs, spec), tol=1e-9)


def test_a_dropout_mask_is_bernoulli_scaled_and_the_same_for_any_thread_count_and_dtype():
    """``draw_mask``: entries 0 or 1 / (1 - p), kept with probability 1 - p (within 5 standard
    errors over 400,000 draws), one pattern for 1 and 2 threads and for float32 and float64."""
    from modelscape.engine.stateful import draw_mask, generator

    p, shape = 0.3, (400, 1000)
    masks = []
    threads = torch.get_num_threads()
    try:
        for n_threads, dtype in ((1, torch.float32), (2, torch.float32), (2, torch.float64)):
            torch.set_num_threads(n_threads)
            like = torch.empty(0, dtype=dtype)
            masks.append(draw_mask(generator(seed=11, step=3, device=CPU), shape, p, like))
    finally:
        torch.set_num_threads(threads)
    m32, m32_again, m64 = masks
    assert m64.dtype == torch.float64 and torch.equal(m32, m32_again)
    assert torch.equal(m32 > 0, m64 > 0)
    assert set(m64.unique().tolist()) == {0.0, 1 / (1 - p)}  # the scale in the job's dtype
    kept = float((m32 > 0).double().mean())
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / m32.numel()) ** 0.5
    other_step = draw_mask(generator(seed=11, step=4, device=CPU), shape, p, m32)
    assert not torch.equal(m32, other_step)


def test_dropout_masks_depend_on_the_job_and_its_step_only():
    jobs, spec = make_jobs(MODEL_CLASS=DropoutNet, MAX_ITER=20, LOSS_CHECKPOINTS=[1e-9])
    first = reference(jobs[:1], spec)
    torch.manual_seed(1234)  # the global generator plays no part
    again = reference(jobs[:1], spec)
    a, b = first[jobs[0].key], again[jobs[0].key]
    assert (a.train_loss, a.test_loss) == (b.train_loss, b.test_loss)
    plain, _ = make_jobs(MODEL_CLASS=DropoutNet, MAX_ITER=20, LOSS_CHECKPOINTS=[1e-9], DROPOUT=0.0)
    _, spec0 = make_jobs(MODEL_CLASS=DropoutNet, MAX_ITER=20, DROPOUT=0.0)
    without = reference(plain[:1], spec0)
    assert first[jobs[0].key].test_loss != without[plain[0].key].test_loss  # the masks act


@pytest.mark.parametrize(
    "model, bfn",
    [(NormNet, quadratic_bfn), (NormCNN, image_bfn)],
    ids=["batchnorm1d", "cnn-batchnorm2d"],
)
def test_a_stacked_job_with_batchnorm_equals_its_one_job_run(model, bfn):
    grabs = {"stats": running_stats}
    jobs, spec = make_jobs(
        bfn, MODEL_CLASS=model, CENTER=True, ONLYTHRESHOLDS=False, otherreturns=grabs
    )
    ref = reference(jobs, spec)
    assert_replayed(ref, BASE["MAX_ITER"])
    got = stacked(jobs, spec)
    # batch statistics under vmap round differently; the running statistics carry it
    assert_same(ref, got, tol=1e-6)
    r = next(iter(ref.values()))
    assert r.curves["stats"].std() > 0  # the running statistics moved, and are compared


@pytest.mark.parametrize("model", [DropoutNet, NormNet])
def test_rows_that_join_a_running_stack_take_their_own_masks_and_statistics(model):
    jobs, spec = make_jobs(MODEL_CLASS=model)
    refilled = stacked(jobs, spec, width=3)
    joined = [r.joined_at for r in refilled.values() if r.joined_at is not None]
    assert len(set(joined)) >= 2 and min(joined) > 0
    assert_same(reference(jobs, spec), refilled, tol=TOL[model])


class Killed(BaseException):
    """The process "dies" here."""


class KilledAfter(Checkpoints):
    def __init__(self, *args, saves, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves = saves

    def save(self, key, state):
        super().save(key, state)
        self.saves -= 1
        if self.saves == 0:
            raise Killed


@pytest.mark.parametrize("model", [DropoutNet, NormNet])
def test_a_resumed_stack_equals_its_one_job_runs(model, tmp_path):
    jobs, spec = make_jobs(MODEL_CLASS=model)
    ckpt = KilledAfter(tmp_path, every_seconds=0.0, saves=2 * len(jobs))  # mid-way
    finished = {}
    with pytest.raises(Killed):
        for record in engine.train_stacked(jobs, spec, CPU, ckpt):
            finished[record.key] = record
    rest = [job for job in jobs if job.key not in finished]
    assert {ckpt.load(job.key)["step"] for job in rest} != {None}
    finished.update(stacked(rest, spec, Checkpoints(tmp_path, every_seconds=0.0)))
    assert_same(reference(jobs, spec), finished, tol=TOL[model])


def test_stateful_modules_without_a_stacked_version_train_one_at_a_time():
    jobs, spec = make_jobs(MODEL_CLASS=AlphaNet, MAX_ITER=10)
    got = {r.key: r for r in engine.train_group(jobs, spec, CPU)}
    assert {r.trained_by for r in got.values()} == {
        "single: the model has AlphaDropout layers (no stacked version)"
    }


class _Calls(TorchDispatchMode):
    """Records the argument shapes of every call of the named aten operations."""

    def __init__(self, *names):
        super().__init__()
        self.names, self.calls = names, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.names:
            shapes = tuple(tuple(a.shape) for a in args if torch.is_tensor(a))
            self.calls.append((func.overloadpacket.__name__, shapes))
        return func(*args, **(kwargs or {}))


def test_a_stack_runs_batchnorm_as_one_kernel_over_its_jobs_channels_with_their_weights():
    """9 jobs of conv-BN-ReLU (4 channels): one batch norm of 36 channels with each job's
    weights as its channels', not a normalization followed by a multiply and an add of each
    job's weights over the activations (``vmap``'s own rule, a pass each way)."""
    jobs, spec = make_jobs(image_bfn, MODEL_CLASS=NormCNN, MAX_ITER=5, LOSS_CHECKPOINTS=[1e-9])
    with _Calls("native_batch_norm", "mul", "add") as seen:
        stacked(jobs, spec)
    assert ("native_batch_norm", ((16, 36, 4, 4), (36,), (36,), (36,), (36,))) in seen.calls
    per_job_weights = [c for c in seen.calls if (9, 4, 1, 1, 1) in c[1]]
    assert not per_job_weights, per_job_weights[:2]


@pytest.mark.parametrize("layout", ["jobs-first", "jobs-second"])
def test_stacked_batchnorm_equals_each_jobs_own_batch_norm(layout):
    """Outputs, gradients and running statistics of the folded batch norm against each job's
    own ``F.batch_norm`` (training), and in evaluation mode against its running statistics."""
    gen = torch.Generator().manual_seed(0)
    jobs, n, c = 3, 8, 5
    x = torch.randn(jobs, n, c, 4, 4, generator=gen, dtype=torch.float64)
    w = torch.randn(jobs, c, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(jobs, c, generator=gen, dtype=torch.float64).requires_grad_(True)
    stats = torch.rand(2, jobs, c, generator=gen, dtype=torch.float64)
    mean, var = stats[0].clone(), stats[1].clone() + 0.5
    dim = 0 if layout == "jobs-first" else 1
    xs = x if dim == 0 else x.movedim(0, 1)  # vmap over another dimension of the input

    def norm(x, m, v, w, b, training):
        return nn.functional.batch_norm(x, m, v, w, b, training, 0.3, 1e-5)

    ms, vs = mean.clone(), var.clone()
    with batched_operations(norms=True, attention=False):
        out = torch.func.vmap(norm, in_dims=(dim, 0, 0, 0, 0, None))(xs, ms, vs, w, b, True)
    gw, gb = torch.autograd.grad((out * x).sum(), (w, b))
    for j in range(jobs):
        wj, bj = w[j].detach().requires_grad_(True), b[j].detach().requires_grad_(True)
        mj, vj = mean[j].clone(), var[j].clone()
        ref = norm(x[j], mj, vj, wj, bj, True)
        rw, rb = torch.autograd.grad((ref * x[j]).sum(), (wj, bj))
        torch.testing.assert_close(out[j], ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((gw[j], gb[j], ms[j], vs[j]), (rw, rb, mj, vj))
    # evaluation: each job's running statistics, no update
    with batched_operations(norms=True, attention=False):
        out = torch.func.vmap(norm, in_dims=(0, 0, 0, 0, 0, None))(x, ms, vs, w, b, False)
    for j in range(jobs):
        torch.testing.assert_close(out[j], norm(x[j], ms[j], vs[j], w[j], b[j], False))


def test_a_stacks_linear_layers_add_their_biases_in_place_into_the_product():
    """``batching._linear``: each job's bias goes into the batched product in place, not as
    ``vmap``'s out-of-place add (a second activation-sized tensor); the numbers are the
    one-job loop's to float rounding (the equivalence tests above)."""
    jobs, spec = make_jobs(MODEL_CLASS=DropoutNet, MAX_ITER=3, LOSS_CHECKPOINTS=[1e-9])
    with _Calls("add", "add_") as seen:
        stacked(jobs, spec)
    n, width = BASE["N_SAMPLES"], BASE["WIDTH"]
    bias_adds = [c for c in seen.calls if (len(jobs), 1, width) in c[1]]  # either operand
    assert {name for name, _ in bias_adds} == {"add_"}, bias_adds[:3]
    assert ((len(jobs), n, width), (len(jobs), 1, width)) in {c[1] for c in bias_adds}

    # so do the packed q/k/v projection's inside a stacked self-attention (``_self_attention``)
    jobs, spec = make_jobs(
        sequence_bfn, MODEL_CLASS="Transformer", WIDTH=8, DEPTH=1, MAX_ITER=3, BIAS=True
    )
    with _Calls("add", "add_") as seen:
        stacked(jobs, spec)
    packed = [c for c in seen.calls if (len(jobs), 1, 1, 3 * 8) in c[1]]
    assert packed and {name for name, _ in packed} == {"add_"}, packed[:3]
