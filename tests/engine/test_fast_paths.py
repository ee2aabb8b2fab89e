"""The engine's fast paths against the one-job loop: each is checked for its numbers and for
having really run.

- the hand-written MLP kernel for every parametrization (multipliers, ScaledReLU, GAMMA), with
  SGD and Adam;
- stacks of jobs with different N_SAMPLES (a ragged layout: no padding), whose jobs' numbers
  equal those of same-N stacks bit for bit;
- the loop rules computed vectorized on the device (EMA, timekeys, divergence, exits) against a
  scalar oracle written here, bit for bit;
- PRECISION: bf16-mixed within a documented tolerance of fp32, tf32 equal to fp32 on the CPU;
- an out-of-memory error in a group splits it and retries;
- the GPU benchmark script in its CPU smoke mode.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sweeps import assert_same, quadratic_bfn, reference, rel

import modelscape
from modelscape import engine
from modelscape.backend.job_iterator import plan
from modelscape.engine import tracking
from modelscape.engine.stacked import kernels

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[2]
# bf16-mixed against fp32, relative, on the final test losses of the stable 60-step runs below
# (bf16 keeps an 8-bit mantissa; measured: at most 4e-3); the README gives the canonical sweep's.
BF16_TOLERANCE = 1e-2


BASE = {
    "WIDTH": 16,
    "DEPTH": 2,
    "N_SAMPLES": 32,
    "N_TEST": 100,
    "MAX_ITER": 80,
    "LR": 0.1,
    "ONLINE": False,
    "LOSS_CHECKPOINTS": [0.9, 0.5],
    "DTYPE": "float64",
    "DEVICES": ["cpu"],
}


def make_jobs(overrides=None, axes=None):
    axes = axes or {"trial": range(2), "GAMMA": [1.0, 4.0], "LR": [0.05, 0.2]}
    # an axis sets its hyperparameter for every job (a config value beside it is refused noisily)
    swept = {{"ntrain": "N_SAMPLES"}.get(name, name) for name in axes}
    config = {k: v for k, v in {**BASE, **(overrides or {})}.items() if k not in swept}
    _, _, jobs, spec = plan(list(axes.values()), list(axes), config, {"base_bfn": quadratic_bfn})
    return jobs, spec


def stacked(jobs, spec):
    groups = engine.group_jobs(jobs, spec=spec)
    out = {}
    for group in groups:
        assert len(group) > 1
        for record in engine.train_stacked(group, spec, CPU):
            assert record.trained_by == "stacked", (record.trained_by, record.error)
            out[record.key] = record
    return out, groups


def assert_bit_identical(a, b):
    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        assert (x.status, x.steps) == (y.status, y.steps), key
        assert x.test_loss == y.test_loss and x.train_loss == y.train_loss, key
        np.testing.assert_array_equal(x.timekeys, y.timekeys)


def kernel_of(job, spec):
    return kernels.kernel_for(engine.setup_job(job, spec, CPU))


# ----------------------------------------------------------------------------- fast MLP kernel


@pytest.mark.parametrize(
    "overrides",
    [
        {"PARAMETRIZATION": "mup", "CENTER": True},
        {"PARAMETRIZATION": "ntp", "BIAS": True, "NONLINEARITY": "tanh", "LR": 1.0},
        {"PARAMETRIZATION": "mfp", "ONLINE": True, "LR": 0.5},
        {"PARAMETRIZATION": "mup", "OPTIMIZER": "Adam", "LR": 0.01, "NONLINEARITY": "gelu"},
        {"PARAMETRIZATION": "ntp", "OPTIMIZER": "Adam", "LR": 0.01, "CENTER": True, "BIAS": True},
        {"PARAMETRIZATION": "mup-lr", "MOMENTUM": 0.9, "DEPTH": 3},
    ],
)
def test_parametrized_mlps_take_the_fast_kernel_and_match_the_loop(overrides):
    jobs, spec = make_jobs(overrides)
    assert kernel_of(jobs[0], spec) is kernels.MLPKernel
    ref = reference(jobs, spec)
    # GAMMA 1 and 4 and two LRs share one stack; jobs exit at different steps
    got, groups = stacked(jobs, spec)
    assert len(groups) == 1
    assert len({r.steps for r in ref.values()}) >= 2
    assert_same(ref, got)


def test_user_models_still_take_the_torch_func_path():
    class Tiny(torch.nn.Module):
        def __init__(self, d_in, d_out, width):
            super().__init__()
            self.a, self.b = torch.nn.Linear(d_in, width), torch.nn.Linear(width, d_out)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    jobs, spec = make_jobs({"MODEL_CLASS": Tiny, "PARAMETRIZATION": "mup"})
    assert kernel_of(jobs[0], spec) is kernels.FuncKernel
    assert_same(reference(jobs, spec), stacked(jobs, spec)[0])


# ----------------------------------------------------------------------------- mixed N


MIXED_N = {"trial": range(2), "ntrain": [64, 128, 256, 512]}


@pytest.mark.parametrize(
    "overrides",
    [
        {"LOSS_CHECKPOINTS": [0.5, 0.3], "CENTER": True},
        {"PARAMETRIZATION": "mup", "OPTIMIZER": "Adam", "LR": 0.01, "BIAS": True},
    ],
)
def test_jobs_with_different_sample_counts_share_one_stack(overrides):
    jobs, spec = make_jobs(overrides, axes={**MIXED_N, "GAMMA": [1.0, 2.0]})
    ref = reference(jobs, spec)
    got, groups = stacked(jobs, spec)
    assert len(groups) == 1  # every N in one stack
    assert len({r.steps for r in ref.values()}) >= 2
    assert_same(ref, got)


def test_a_mixed_n_stack_computes_each_job_as_a_same_n_stack_does():
    """No padding: a job's numbers do not depend on the sample counts of the other jobs in its
    stack, bit for bit, so results stay independent of grouping, workers and resumption."""
    jobs, spec = make_jobs({"DTYPE": "float32", "BIAS": True}, axes=MIXED_N)
    mixed = {r.key: r for r in engine.train_stacked(jobs, spec, CPU)}
    per_n = {}
    for n in MIXED_N["ntrain"]:
        same = [job for job in jobs if job.hp.N_SAMPLES == n]
        per_n.update({r.key: r for r in engine.train_stacked(same, spec, CPU)})
    assert_bit_identical(mixed, per_n)
    # a part of the stack (as in a resumed sweep) and the jobs in another order
    part = [jobs[1], jobs[6], jobs[3]]
    assert_bit_identical({r.key: r for r in engine.train_stacked(part, spec, CPU)},
                         {k: mixed[k] for k in (j.key for j in part)})  # fmt: skip


def test_models_the_fast_kernel_cannot_take_group_by_sample_count():
    jobs, spec = make_jobs({"LOSS": "L1Loss"}, axes=MIXED_N)
    groups = engine.group_jobs(jobs, spec=spec)
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2]
    assert all(len({j.hp.N_SAMPLES for j in g}) == 1 for g in groups)


# ----------------------------------------------------------------------------- tracking


def oracle(losses, s, thresholds, max_iter, t0=0, ema=math.nan, timekeys=None):
    """The loop rules as the original loop wrote them, one scalar at a time (float64)."""
    thresholds = sorted(thresholds, reverse=True)
    timekeys = np.full(len(thresholds), np.nan) if timekeys is None else timekeys.copy()
    crossed = int(np.count_nonzero(~np.isnan(timekeys)))
    exit_step, diverged, trail = None, False, []
    for i, value in enumerate(losses):
        step = t0 + i
        if not math.isfinite(value):
            exit_step, diverged = step, True
            break
        ema = value if step == 0 else s * ema + (1 - s) * value
        trail.append(ema)
        while crossed < len(thresholds) and ema < thresholds[crossed]:
            timekeys[crossed] = step
            crossed += 1
        if crossed == len(thresholds) or step == max_iter - 1:
            exit_step = step
            break
    return ema, timekeys, exit_step, diverged, trail


def test_vectorized_loop_rules_equal_the_scalar_rules_bit_for_bit():
    rng = np.random.default_rng(0)
    axes = {"trial": range(3), "EMA_SMOOTHER": [0.0, 0.5, 0.9, 0.99], "MAX_ITER": [40, 100]}
    jobs, _ = make_jobs({"LOSS_CHECKPOINTS": [0.6, 0.35, 0.2], "ONLYTHRESHOLDS": False}, axes=axes)
    n_steps = 100
    # decaying noisy losses, float32 as the device computes them, with a few divergences
    losses = np.exp(-rng.uniform(0.005, 0.05, (len(jobs), 1)) * np.arange(n_steps))
    losses = (losses * rng.uniform(0.8, 1.25, losses.shape)).astype(np.float32)
    losses[2, 17] = np.nan
    losses[5, 0] = np.inf
    tracks = [tracking.Track.start(job) for job in jobs]
    tracker = tracking.Tracker(tracks)
    rows = list(range(len(jobs)))
    for t0 in range(0, n_steps, 32):  # windows of 32, as the stacked run syncs
        live = [r for r in rows if tracks[r].exit is None]
        if not live:
            break
        window = torch.from_numpy(losses[live, t0 : t0 + 32])
        tracker.consume(t0, window, live)
    for r, job in enumerate(jobs):
        hp = job.hp
        values = [float(v) for v in losses[r, : hp.MAX_ITER]]
        ema, timekeys, exit_step, diverged, trail = oracle(
            values, hp.EMA_SMOOTHER, hp.LOSS_CHECKPOINTS, hp.MAX_ITER
        )
        track = tracks[r]
        assert (track.exit, track.diverged) == (exit_step, diverged), r
        np.testing.assert_array_equal(track.timekeys, timekeys)
        if not diverged:
            assert track.ema == ema
        np.testing.assert_array_equal(track.curves.train[: len(trail)], trail)
    assert {tracks[r].exit for r in rows} >= {0, 17, 39, 99}  # diverged, diverged, MAX_ITER


@pytest.mark.parametrize("t0", [0, 32, 64])
def test_the_device_loop_rules_equal_the_host_ones_bit_for_bit(t0):
    """``scan`` on torch tensors (what a CUDA stack runs, here on CPU tensors) gives the numpy
    path's result bit for bit: timekeys, exits, divergence, the EMA and the trail. With the
    test above (numpy against a scalar oracle), the device path equals the one-job loop."""
    rng = np.random.default_rng(t0)
    R, W, K = 12, 32, 3
    losses = np.exp(-rng.uniform(0.005, 0.08, (R, 1)) * np.arange(t0, t0 + W))
    losses = (losses * rng.uniform(0.8, 1.25, losses.shape)).astype(np.float32)
    losses[1, 5], losses[4, 0], losses[7, 31] = np.nan, np.inf, -np.inf
    ema = rng.uniform(0.2, 1.0, R)
    thresholds = np.sort(rng.uniform(0.05, 0.9, (R, K)), 1)[:, ::-1].copy()
    timekeys = np.full((R, K), np.nan)
    timekeys[2, 0] = t0 - 3.0  # a threshold crossed in an earlier window
    s = rng.choice([0.0, 0.5, 0.9, 0.99], R)
    last = rng.choice([t0 + 10, t0 + W + 40, 10**6], R).astype(np.float64)
    host_args = (losses, ema, timekeys, thresholds, s, last)
    host = tracking.scan(np, t0, *host_args, True)
    device = tracking.scan(torch, t0, *map(torch.from_numpy, host_args), True).numpy()
    assert host.shape == (R, K + 3 + 2 * W)
    np.testing.assert_array_equal(device, host)
    exits = host[:, K]
    assert (exits >= 0).any() and (exits < 0).any() and host[:, K + 1].any()


# ----------------------------------------------------------------------------- precision


def test_bf16_mixed_is_within_its_tolerance_of_fp32_stacked_and_alone():
    overrides = {"DTYPE": "float32", "PARAMETRIZATION": "mup", "MAX_ITER": 60, "CENTER": True}
    overrides["LOSS_CHECKPOINTS"] = [0.0]  # every job runs all its steps
    axes = {"trial": range(2), "GAMMA": [1.0, 2.0], "LR": [0.02, 0.05]}
    jobs, spec = make_jobs(overrides, axes)
    fp32 = stacked(jobs, spec)[0]
    bf_jobs, bf_spec = make_jobs({**overrides, "PRECISION": "bf16-mixed"}, axes)
    assert kernel_of(bf_jobs[0], bf_spec) is kernels.MLPKernel
    bf16 = stacked(bf_jobs, bf_spec)[0]
    alone = reference(bf_jobs[:3], bf_spec)
    for key, r in fp32.items():
        assert rel(r.test_loss, bf16[key].test_loss) <= BF16_TOLERANCE, key
        assert r.test_loss != bf16[key].test_loss  # bf16 really ran
    for key, r in alone.items():
        assert rel(fp32[key].test_loss, r.test_loss) <= BF16_TOLERANCE, key
        assert r.test_loss != fp32[key].test_loss


def test_tf32_is_fp32_on_the_cpu_and_precision_needs_float32():
    jobs, spec = make_jobs({"DTYPE": "float32", "MAX_ITER": 30})
    tf_jobs, tf_spec = make_jobs({"DTYPE": "float32", "MAX_ITER": 30, "PRECISION": "tf32"})
    assert_bit_identical(stacked(jobs, spec)[0], stacked(tf_jobs, tf_spec)[0])
    with pytest.raises(modelscape.HParamError, match="DTYPE"):
        make_jobs({"PRECISION": "bf16-mixed"})  # BASE has DTYPE float64


# ----------------------------------------------------------------------------- memory


def test_an_out_of_memory_group_splits_and_retries(monkeypatch):
    """CUDA runs out of memory in a stack of more than 2 jobs (raised by torch.bmm here, since
    the CPU has no such limit): the group is split until it fits, and every job still gets the
    numbers it gets in any stack."""
    jobs, spec = make_jobs({"DTYPE": "float32"})
    whole = {r.key: r for r in engine.train_stacked(jobs, spec, CPU)}
    bmm = torch.bmm

    def small_memory(a, b, **kwargs):
        if a.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return bmm(a, b, **kwargs)

    monkeypatch.setattr(torch, "bmm", small_memory)
    split = {r.key: r for r in engine.train_stacked(jobs, spec, CPU)}
    assert all(r.status == "ok" for r in split.values())
    assert_bit_identical(whole, split)


# ----------------------------------------------------------------------------- benchmarks


def test_the_gpu_benchmark_runs_in_its_cpu_smoke_mode(tmp_path):
    notes = tmp_path / "notes.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--quick", "--notes", notes],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = notes.read_text()
    for precision in ("fp32", "tf32", "bf16-mixed"):
        assert f"| {precision} |" in table
    assert "job-steps/s" in table and "HEA-like" in table


CHURN = """
import resource, torch
from modelscape.engine.allocator import keep_freed_memory

print(keep_freed_memory())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(20):
    # a step's temporaries: 8 buffers of about 1 MiB, a little larger each step (a stack
    # that grows would do that; glibc then maps each one afresh however it adapts)
    buffers = [torch.ones(2**18 + step * 2**12) for _ in range(8)]
    del buffers
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_are_reused_by_the_next_step():
    """20 steps that each allocate and free about 8 MiB of temporaries: under glibc's default
    thresholds every step maps its ~2048 pages afresh; after ``keep_freed_memory`` (which every
    group's training calls) the first step's pages are reused."""
    runs = {}
    for setting in ("default", "modelscape"):
        env = {**os.environ, "MODELSCAPE_MALLOC": setting}
        out = subprocess.run(
            [sys.executable, "-c", CHURN], capture_output=True, text=True, check=True, env=env
        ).stdout.split()
        runs[setting] = (out[0] == "True", int(out[1]))
    pages = 8 * 2**20 // 4096
    assert runs["default"][0] is False and runs["modelscape"][0] is True
    assert runs["default"][1] > 15 * pages  # fresh pages nearly every step
    assert runs["modelscape"][1] < 3 * pages  # the first step's, then reused
