"""One stacked training run: the jobs of a group as one model with a leading job dimension.

Each job is still built by ``setup.setup_job``, so its data and initial weights are exactly
those of the one-job loop; the stacked run reproduces ``loop.train`` up to float rounding
(timekeys exactly). Losses stay on the device; every ``sync_every`` steps (and at evaluation
steps) the window's losses [jobs x steps] go to ``tracking.Tracker``, which applies the same
loop rules as the one-job loop where the losses are and copies back, once, what is recorded.
Jobs with different N_SAMPLES share a stack when the MLP kernel trains them (their samples lie
ragged along ``stack.Layout``). A job that exits inside a window is replayed
from the window's start on its own, so its final parameters are those of its exit step; the
others carry on, and the exited job's rows leave the stack. The test loss and grabs run on the
job's own module (its ``Problem.model``, with the stacked values copied in) only where they are
recorded.

Whether a group trains here is decided before any step (``grouping.why_single``, and
``Unbatchable`` for what only the built models reveal); once a stack trains, an error fails its
unfinished jobs and is never retried elsewhere, except running out of device memory: then the
unfinished jobs train again in two smaller stacks (``memory``). PRECISION and COMPILE apply
here as in the one-job loop (``precision``, ``graphs``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from modelscape.engine import precision
from modelscape.engine.failures import failed_record, failure_boundary
from modelscape.engine.loop import train
from modelscape.engine.setup import (
    GlobalRngs,
    Problem,
    kept_global_rngs,
    seed_global_rngs,
    setup_job,
    to_device,
    training_rng_seed,
)
from modelscape.engine.stacked import graphs, memory
from modelscape.engine.stacked.grouping import GROUP_BYTES, STACKED, group_cap, refuse
from modelscape.engine.stacked.kernels import FuncKernel, MLPKernel, kernel_for
from modelscape.engine.stacked.optimizers import STACKED_OPTIMIZERS
from modelscape.engine.stacked.stack import Layout, Stack, Unbatchable
from modelscape.engine.state import job_state_dict, load_checkpoint
from modelscape.engine.tracking import (
    SYNC_EVERY,
    Track,
    Tracker,
    evaluate,
    say,
)
from modelscape.results.records import JobRecord
from modelscape.store.checkpoints import Checkpoints
from modelscape.sweep.checks import check_finite
from modelscape.sweep.jobs import Job
from modelscape.sweep.spec import SweepSpec, check_batch

# Modules whose training step is random or updates buffers: replaying a window from a snapshot of
# the parameters would not reproduce them, so their models train one job at a time.
STATEFUL_MODULES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)


def train_stacked(
    jobs: Sequence[Job],
    spec: SweepSpec,
    device: torch.device,
    checkpoints: Checkpoints | None = None,
    *,
    sync_every: int = SYNC_EVERY,
    group_bytes: int = GROUP_BYTES,
) -> Iterator[JobRecord]:
    """Train ``jobs`` as one stacked model on ``device``, yielding each record as it finishes.

    A job whose setup fails gets a failed record; the rest still train together. With
    ``checkpoints``, each running job is saved under its own key in the one-job loop's format,
    so a job resumes here or in ``loop.train`` alike; jobs resumed from different steps train
    as separate stacks. A group whose built models cannot share a stack (``Unbatchable``)
    trains one job at a time, and its records say why. On CUDA the group trains in chunks that
    fit the device's free memory (``memory.chunks``); a stack that runs out of memory anyway is
    split in two and its unfinished jobs start again (from their checkpoints, if any).
    """
    jobs = list(jobs)
    done: set = set()
    try:
        for chunk in memory.chunks(jobs, device):
            for record in _train_jobs(chunk, spec, device, checkpoints, sync_every, group_bytes):
                done.add(record.key)
                yield record
    except torch.OutOfMemoryError:
        # A stack too large for the device: the jobs not reported yet train again, from their
        # start (or checkpoint), in two halves; their numbers do not depend on the stack.
        left = [job for job in jobs if job.key not in done]
        memory.release(device)
        if len(left) == 1:
            yield from _train_alone_or_fail(left[0], spec, device, checkpoints, sync_every)
            return
        say(f"modelscape: out of memory in a stack of {len(left)} jobs; splitting it.", sys.stderr)
        half = (len(left) + 1) // 2
        for part in (left[:half], left[half:]):
            yield from train_stacked(
                part, spec, device, checkpoints, sync_every=sync_every, group_bytes=group_bytes
            )


def _train_alone_or_fail(job, spec, device, checkpoints, sync_every):
    """A job whose stack of one ran out of memory: once more (memory was released), then a
    failed record."""
    try:
        yield from _train_jobs([job], spec, device, checkpoints, sync_every, GROUP_BYTES)
    except torch.OutOfMemoryError as err:
        yield failed_record(job, err, device, STACKED)


def _train_jobs(jobs, spec, device, checkpoints, sync_every, group_bytes):
    """Set up and train jobs that fit the device together, measuring their footprint."""
    with memory.Footprint(jobs, device):
        yield from _set_up_and_train(jobs, spec, device, checkpoints, sync_every, group_bytes)


def _set_up_and_train(jobs, spec, device, checkpoints, sync_every, group_bytes):
    problems: list[Problem] = []
    for job in jobs:
        with failure_boundary(job, device, STACKED, passes=torch.OutOfMemoryError) as failed:
            problems.append(setup_job(job, spec, device))
        if failed.record is not None:
            yield failed.record
    if not problems:
        return
    with kept_global_rngs(device), precision.matmuls(jobs[0].hp.PRECISION):
        resumed = [load_checkpoint(p, checkpoints) for p in problems]
        if checkpoints is not None:
            checkpoints.reset_clock()
        starts = [track.step + 1 for track, _ in resumed]
        for start in sorted(set(starts)):
            part = [(p, *r) for p, r, s in zip(problems, resumed, starts) if s == start]
            for sizes in _parts_by_kernel(part):
                yield from _train_part(sizes, device, checkpoints, start, sync_every, group_bytes)


def _parts_by_kernel(part):
    """The part as it can stack: whole when its kernel takes mixed N_SAMPLES (``MLPKernel``),
    else one part per sample count (a group formed from hyperparameters whose built models
    turned out to need ``FuncKernel``, e.g. after a ``post_init_fn``)."""
    if kernel_for(part[0][0]) is MLPKernel:
        return [part]
    by_n: dict[int, list] = {}
    for item in part:
        by_n.setdefault(item[0].job.hp.N_SAMPLES, []).append(item)
    return list(by_n.values())


def _train_part(part, device, checkpoints, start, sync_every, group_bytes):
    """Train jobs that all start at ``start``: stacked if their models allow it."""
    try:
        run = Run(part, device, checkpoints, start, sync_every, group_bytes)
    except Unbatchable as why:
        trained_by = refuse(part[0][0].job, str(why))
        for p, _, _ in part:
            with failure_boundary(p.job, p.device, trained_by, lambda p=p: p.step) as failed:
                record = train(p, checkpoints, trained_by)
            yield record if failed.record is None else failed.record
        return
    try:
        yield from run.records()
    except torch.OutOfMemoryError:
        raise  # train_stacked splits the stack
    except Exception as err:  # noqa: BLE001 - the group's unfinished jobs become failed records
        for r in run.stack.rows if run.stack is not None else []:
            if run.tracks[r].exit is None:  # not reported yet
                yield failed_record(run.problems[r].job, err, device, STACKED, run.step)


class Run:
    """One stacked training run of jobs that all start at step ``start``."""

    def __init__(self, part, device, checkpoints, start, sync_every, group_bytes):
        # rows sorted by sample count: each count's jobs form one segment of the layout
        part = sorted(part, key=lambda item: item[0].job.hp.N_SAMPLES)
        problems = [p for p, _, _ in part]
        self.problems = problems
        self.device = device
        self.checkpoints = checkpoints
        self.start = start
        self.sync_every = sync_every
        p0 = problems[0]
        self.hp = p0.job.hp
        self.online = self.hp.ONLINE
        self.names = [n for n, _ in p0.model.named_parameters()]
        self._check_shapes()
        # A job that could share a stack (cap >= 2) computes a stack of one as a pair, so its
        # numbers are those of any larger stack; one whose cap is 1 always trains alone, in
        # every run, and skips the pair's second copy. The cap depends on the shape
        # hyperparameters only, so it is the same for every job of the group.
        self.pairs = [group_cap(p.job, group_bytes) >= 2 for p in problems]
        compute = precision.compute_dtype(self.hp.PRECISION)
        if kernel_for(p0) is MLPKernel:
            self.kernel: MLPKernel | FuncKernel = MLPKernel(p0.model, self.names, compute)
        else:
            self.kernel = FuncKernel(problems, self.names, self.pairs[0], compute)
        opt_cls = STACKED_OPTIMIZERS.get(type(p0.opt))
        if opt_cls is None:
            raise Unbatchable(f"optimizer {type(p0.opt).__name__} has no stacked version")
        self.opt = opt_cls(problems, self.names)
        self.step_fn = graphs.step_function(self.kernel.loss_and_grads, self.hp.COMPILE, device)
        self.tracks = [track for _, track, _ in part]
        self.tracker = Tracker(self.tracks)
        # The one-job loop seeds the global generators per job; keep their states per job in
        # case an online batch function draws from them (checked at the first draw).
        self.rngs: list[GlobalRngs | None] = []
        for p, _, rng in part:
            if self.online and rng is None:
                seed_global_rngs(training_rng_seed(p.job))
                rng = GlobalRngs.now()
            self.rngs.append(rng if self.online else None)
        self.stack: Stack | None = self._stack()
        self.uses_global_rng = False
        self.step = start  # the step being trained: where a failure happened

    def _check_shapes(self) -> None:
        p0 = self.problems[0]
        stateful = {type(m).__name__ for m in p0.model.modules() if isinstance(m, STATEFUL_MODULES)}
        if stateful:
            raise Unbatchable(f"the model has {', '.join(sorted(stateful))} layers")
        names = [(n, t.shape, t.dtype) for n, t in p0.model.named_parameters()]
        for p in self.problems[1:]:
            if [(n, t.shape, t.dtype) for n, t in p.model.named_parameters()] != names:
                raise Unbatchable("the jobs' models have different parameters")
            if type(p.model) is not type(p0.model) or p.squeeze != p0.squeeze:
                raise Unbatchable("the jobs' models are of different classes")
            if not self.online and (
                p.X_tr.shape[1:] != p0.X_tr.shape[1:] or p.y_tr.shape[1:] != p0.y_tr.shape[1:]
            ):
                raise Unbatchable("the jobs' training samples have different shapes")
        if self.online and self.hp.CENTER and p0.model0 is None:
            raise Unbatchable("online centering without an initial model")

    def _stack(self) -> Stack:
        ps = self.problems
        params = [
            torch.stack([dict(p.model.named_parameters())[n].detach() for p in ps])
            for n in self.names
        ]
        hyper = self.opt.hyper(params)
        slots = self.opt.import_slots(ps, self.names, params)
        gamma = torch.tensor([p.gamma for p in ps], dtype=params[0].dtype, device=self.device)
        data: dict[str, torch.Tensor | None] = {"gamma": gamma}
        layout = Layout([p.job.hp.N_SAMPLES for p in ps], self.pairs)
        samples: dict[str, torch.Tensor | None] = {
            "X": None if self.online else torch.cat([p.X_tr for p in ps]),
            "y": None if self.online else torch.cat([p.y_tr for p in ps]),
            "f0": None if self.online or ps[0].f0_tr is None else torch.cat([p.f0_tr for p in ps]),
        }
        if isinstance(self.kernel, FuncKernel):
            data.update(self.kernel.stacked_buffers(ps))
        else:
            samples.update(self.kernel.samples(ps, layout))
        init = None
        if self.online and self.hp.CENTER:
            init = [
                torch.stack([dict(p.model0.named_parameters())[n].detach() for p in ps])
                for n in self.names
            ]
        return Stack(list(range(len(ps))), params, slots, hyper, data, samples, layout, init)

    # -- batches

    def _draw(self, stack: Stack, step: int):
        """The online batch of ``step`` for every job in ``stack``, stacked."""
        Xs, ys = [], []
        for r in stack.rows:
            p = self.problems[r]
            if self.uses_global_rng or step == self.start:
                self.rngs[r].put()
            X, y = p.batch_fn(step)
            if step == 0:
                check_batch(X, y, p.job.hp.N_SAMPLES, "batch_fn(0)")
                check_finite(X, y, f"job ({p.job.label()}), batch_fn(0)")
            if self.uses_global_rng or step == self.start:
                after = GlobalRngs.now()
                if not after.same_as(self.rngs[r]):
                    self.uses_global_rng = True
                self.rngs[r] = after
            X, y = to_device(X, y, self.device, p.job.hp.DTYPE)
            Xs.append(X)
            ys.append(y)
        X, y = torch.cat(Xs), torch.cat(ys)
        f0 = None
        if stack.init is not None:
            with torch.no_grad():
                f0 = self.kernel.forward(stack, stack.init, X)
        return X, y, f0

    def _batch(self, stack: Stack, step: int, cache: list | None):
        if not self.online:
            return stack.samples["X"], stack.samples["y"], stack.samples["f0"]
        batch = self._draw(stack, step)
        if cache is not None:
            cache.append(batch)
        return batch

    def _train_step(self, stack: Stack, X, y, f0, step: int) -> torch.Tensor:
        losses, grads = self.step_fn(stack, X, y, f0)
        self.opt.step(stack, grads, step)
        return losses

    # -- the loop

    def _window_end(self, t: int) -> int:
        end = t + self.sync_every
        for r in self.stack.rows:
            hp = self.problems[r].job.hp
            end = min(end, hp.MAX_ITER)
            if not hp.ONLYTHRESHOLDS:
                # stop right after the next evaluation step, where the curves need the state
                end = min(end, (t + hp.EVAL_EVERY - 1) // hp.EVAL_EVERY * hp.EVAL_EVERY + 1)
        return end

    def records(self) -> Iterator[JobRecord]:
        t = self.start
        while self.stack is not None and self.stack.rows:
            stack = self.stack
            t1 = self._window_end(t)
            saved = stack.mutable()
            cache: list | None = [] if self.online else None
            window = []
            for step in range(t, t1):
                self.step = step
                X, y, f0 = self._batch(stack, step, cache)
                window.append(self._train_step(stack, X, y, f0, step))
            self.tracker.consume(t, torch.stack(window, 1), stack.rows)
            last = (X, y)
            exits: list[int] = []
            replay: list[int] = []
            for pos, r in enumerate(stack.rows):
                track = self.tracks[r]
                if track.exit is None:
                    if track.eval_due(t1 - 1):
                        with failure_boundary(
                            track.job, self.device, STACKED, lambda t=t1 - 1: t
                        ) as failed:  # a failing grab fails its job only
                            self._eval(stack, pos, r, last, t1 - 1)
                        if failed.record is not None:
                            track.exit = t1 - 1
                            exits.append(pos)
                            yield failed.record
                    continue
                exits.append(pos)
                if track.diverged:
                    yield self.tracker.finish(track, self.problems[r], None, STACKED)
                elif track.exit == t1 - 1:
                    yield self._finish(stack, pos, r, last)
                else:
                    replay.append(pos)
            if replay:
                yield from self._replay(stack, saved, replay, cache, t)
            if exits:
                keep = [pos for pos in range(len(stack.rows)) if pos not in exits]
                self.stack = stack.take(keep) if keep else None
            t = t1
            if self.stack is not None and self.checkpoints is not None and self.checkpoints.due():
                self._save(self.stack, t - 1)

    def _replay(self, stack: Stack, saved, replay: list[int], cache, t0: int):
        """Rerun the window for the jobs that exited inside it, each up to its exit step."""
        whole = Stack(
            list(stack.rows),
            *saved,
            stack.hyper,
            stack.data,
            stack.samples,
            stack.layout,
            stack.init,
        )
        sub = whole.take(replay)
        flat = torch.tensor(stack.layout.take(replay)[1], device=self.device)
        end = max(self.tracks[r].exit for r in sub.rows)
        for step in range(t0, end + 1):
            if self.online:
                X, y, f0 = cache[step - t0]
                X, y = X.index_select(0, flat), y.index_select(0, flat)
                f0 = None if f0 is None else f0.index_select(0, flat)
            else:
                X, y, f0 = sub.samples["X"], sub.samples["y"], sub.samples["f0"]
            self._train_step(sub, X, y, f0, step)
            for pos, r in enumerate(sub.rows):
                if self.tracks[r].exit == step:
                    yield self._finish(sub, pos, r, (X, y))

    def _load_job(self, stack: Stack, pos: int, r: int, step: int, with_opt: bool) -> None:
        """Copy row ``pos`` into the job's own module (and optimizer) for evaluation or saving."""
        p = self.problems[r]
        with torch.no_grad():
            for i, param in enumerate(p.model.parameters()):
                param.copy_(stack.params[i][pos])
        if with_opt:
            self.opt.export(stack, pos, p, self.names, step + 1)

    def _eval(self, stack: Stack, pos: int, r: int, batch, step: int) -> None:
        p = self.problems[r]
        self._load_job(stack, pos, r, step, with_opt=bool(p.grabs))
        rows = stack.layout.rows_of(pos)
        values = evaluate(p, batch[0][rows], batch[1][rows], step)
        self.tracks[r].curves.add_eval(step, values)

    def _finish(self, stack: Stack, pos: int, r: int, batch) -> JobRecord:
        p, track = self.problems[r], self.tracks[r]
        step = track.exit
        with failure_boundary(p.job, self.device, STACKED, lambda: step) as failed:
            if track.eval_due(step):  # a failing grab fails its job only
                self._eval(stack, pos, r, batch, step)
            else:
                self._load_job(stack, pos, r, step, with_opt=bool(p.grabs))
            rows = stack.layout.rows_of(pos)
            return self.tracker.finish(track, p, (batch[0][rows], batch[1][rows]), STACKED)
        return failed.record

    def _save(self, stack: Stack, step: int) -> None:
        """Checkpoint every running job in the one-job loop's format."""
        for pos, r in enumerate(stack.rows):
            track: Track = self.tracks[r]
            self._load_job(stack, pos, r, step, with_opt=True)
            if self.rngs[r] is not None:
                self.rngs[r].put()
            seconds = self.tracker.seconds(track)
            self.checkpoints.save(track.job.key, job_state_dict(self.problems[r], track, seconds))
