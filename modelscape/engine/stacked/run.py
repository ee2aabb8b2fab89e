"""One stacked training run: the jobs of a group as one model with a leading job dimension.

Each job is still built by ``setup.setup_job``, so its data and initial weights are exactly
those of the one-job loop; the stacked run reproduces ``loop.train`` up to float rounding
(timekeys exactly). Losses stay on the device; every ``sync_every`` steps (and at evaluation
steps) the window's losses [jobs x steps] go to ``tracking.Tracker``, which applies the same
loop rules as the one-job loop where the losses are and copies back, once, what is recorded.
Jobs with different N_SAMPLES share a stack when the MLP kernel trains them (their samples lie
ragged along ``stack.Layout``). A job that exits inside a window is replayed
from the window's start on its own, so its final parameters are those of its exit step; the
others carry on, and the exited job's rows leave the stack, where waiting jobs may join it
(``refill``: each row then takes its own step, ``Stack.offsets``). The test loss and grabs
run on the job's own module (its ``Problem.model``, with the stacked values copied in) only
where they are recorded.

Whether a group trains here is decided before any step (``grouping.why_single``, and
``Unbatchable`` for what only the built models reveal); once a stack trains, an error fails its
unfinished jobs and is never retried elsewhere, except running out of device memory: then the
unfinished jobs train again in smaller stacks (``memory``, ``refill.train_stacked``).
PRECISION and COMPILE apply here as in the one-job loop (``precision``, ``graphs``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from modelscape.engine import precision
from modelscape.engine.failures import failure_boundary
from modelscape.engine.setup import (
    GlobalRngs,
    Problem,
    seed_global_rngs,
    to_device,
    training_rng_seed,
)
from modelscape.engine.stacked import graphs
from modelscape.engine.stacked.grouping import STACKED, group_cap
from modelscape.engine.stacked.kernels import FuncKernel, MLPKernel, kernel_for
from modelscape.engine.stacked.optimizers import STACKED_OPTIMIZERS
from modelscape.engine.stacked.stack import BUFFER, Layout, Stack, Unbatchable
from modelscape.engine.state import job_state_dict
from modelscape.engine.stateful import refusal
from modelscape.engine.tracking import (
    Track,
    Tracker,
    evaluate,
)
from modelscape.results.records import JobRecord
from modelscape.sweep.checks import check_finite
from modelscape.sweep.jobs import SubSeeds
from modelscape.sweep.spec import check_batch


def can_share(a: Problem, b: Problem) -> bool:
    """Whether two jobs' built models take the same kernel, and may share its stack: any
    N_SAMPLES when it takes mixed ones (``MLPKernel``), else the same (a group formed from
    hyperparameters whose built models turned out to need ``FuncKernel``, e.g. after a
    ``post_init_fn``)."""
    kernel = kernel_for(a)
    return kernel_for(b) is kernel and (
        kernel is MLPKernel or a.job.hp.N_SAMPLES == b.job.hp.N_SAMPLES
    )


class Run:
    """One stacked training run: its jobs, and those that join it from ``waiting``.

    The run counts its own steps ``t`` (from 0); a row takes its own step ``t - offsets[r]``.
    """

    def __init__(self, part, spec, device, checkpoints, sync_every, group_bytes, waiting=None):
        # rows sorted by sample count: each count's jobs form one segment of the layout
        part = sorted(part, key=lambda item: item[0].job.hp.N_SAMPLES)
        problems = [p for p, _, _ in part]
        self.problems = problems
        self.device = device
        self.checkpoints = checkpoints
        self.sync_every = sync_every
        self.spec, self.group_bytes = spec, group_bytes
        self.waiting = waiting
        p0 = self.p0 = problems[0]  # the stack's shapes: every job that joins must match them
        self.hp = p0.job.hp
        self.online = self.hp.ONLINE
        self.names = [n for n, _ in p0.model.named_parameters()]
        self._check_shapes(problems)
        # A job that could share a stack (cap >= 2) computes a stack of one as a pair, so its
        # numbers are those of any larger stack; one whose cap is 1 always trains alone, in
        # every run, and skips the pair's second copy. The cap depends on the job's shape
        # only, so it is the same for every job of the group.
        self.pairs = [group_cap(p.job, group_bytes, spec=spec) >= 2 for p in problems]
        compute = precision.compute_dtype(self.hp.PRECISION)
        if kernel_for(p0) is MLPKernel:
            self.kernel: MLPKernel | FuncKernel = MLPKernel(p0, self.names, compute)
        else:
            self.kernel = FuncKernel(problems, self.names, self.pairs[0], compute)
            reason = self.kernel.probe(p0, self.hp.N_SAMPLES)
            if reason is not None:
                raise Unbatchable(reason)
        opt_cls = STACKED_OPTIMIZERS.get(type(p0.opt))
        if opt_cls is None:
            raise Unbatchable(f"optimizer {type(p0.opt).__name__} has no stacked version")
        self.opt = opt_cls(problems, self.names)
        # Dropout masks change every step, BatchNorm statistics are updated: no CUDA graph
        stateful = isinstance(self.kernel, FuncKernel) and self.kernel.stateful
        self.dropout = isinstance(self.kernel, FuncKernel) and self.kernel.draws_masks
        compile_mode = "off" if stateful else self.hp.COMPILE
        self.step_fn = graphs.step_function(self.kernel.loss_and_grads, compile_mode, device)
        self.opt.relayout = not isinstance(self.step_fn, graphs.GraphedStep)
        self.dropout_seeds: dict[int, int] = {}  # per row: the job's Dropout stream
        self.tracker = Tracker([track for _, track, _ in part])
        self.tracks = self.tracker.tracks  # those that join the run are added to it
        self.rngs = [self._rngs(p, rng) for p, _, rng in part]
        self.offsets = [-(track.step + 1) for track in self.tracks]  # per job, as in Stack
        self.begins = [0] * len(problems)  # the run's step at which each job's first step is
        self.joined_at: dict[tuple, int] = {}
        self.stack: Stack | None = self._stack(list(range(len(problems))))
        self.uses_global_rng = False
        self.step = 0  # the run's step being trained: where a failure happened

    def _rngs(self, p: Problem, rng: GlobalRngs | None) -> GlobalRngs | None:
        """The one-job loop seeds the global generators per job; keep their states per job in
        case an online batch function draws from them (checked at the first draw)."""
        if self.online and rng is None:
            seed_global_rngs(training_rng_seed(p.job))
            rng = GlobalRngs.now()
        return rng if self.online else None

    def _check_shapes(self, problems: Sequence[Problem]) -> None:
        p0 = self.p0
        names = [(n, t.shape, t.dtype) for n, t in p0.model.named_parameters()]
        for p in problems:
            reason = refusal(p.model)
            if reason is not None:
                raise Unbatchable(reason)
            if [(n, t.shape, t.dtype) for n, t in p.model.named_parameters()] != names:
                raise Unbatchable("the jobs' models have different parameters")
            if type(p.model) is not type(p0.model) or p.squeeze != p0.squeeze:
                raise Unbatchable("the jobs' models are of different classes")
            if not self.online and (
                p.X_tr.shape[1:] != p0.X_tr.shape[1:] or p.y_tr.shape[1:] != p0.y_tr.shape[1:]
            ):
                raise Unbatchable("the jobs' training samples have different shapes")
            if self.online and self.hp.CENTER and p.model0 is None:
                raise Unbatchable("online centering without an initial model")

    def _state(self, rows: Sequence[int]) -> tuple[list[torch.Tensor], dict]:
        """The parameters and optimizer state of jobs ``rows``, stacked from their modules."""
        ps = [self.problems[r] for r in rows]
        params = [
            torch.stack([dict(p.model.named_parameters())[n].detach() for p in ps])
            for n in self.names
        ]
        return params, self.opt.import_slots(ps, self.names, params)

    def _stack(self, rows: Sequence[int], state: tuple | None = None) -> Stack:
        """The stack of jobs ``rows`` (sorted by sample count), with ``state`` (parameters and
        slots, in that order) or their modules' state."""
        ps = [self.problems[r] for r in rows]
        params, slots = self._state(rows) if state is None else state
        hyper = self.opt.hyper(params, rows)
        gamma = torch.tensor([p.gamma for p in ps], dtype=params[0].dtype, device=self.device)
        data: dict[str, torch.Tensor | None] = {"gamma": gamma}
        layout = Layout([p.job.hp.N_SAMPLES for p in ps], [self.pairs[r] for r in rows])
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
        offsets = [self.offsets[r] for r in rows]
        return Stack(list(rows), params, slots, hyper, data, samples, layout, offsets, init)

    # -- refill

    def _refill(self, t: int) -> Iterator[JobRecord]:
        """Waiting jobs join the stack at the run's step ``t``, in the rows that freed up."""
        running = [] if self.stack is None else [self.problems[r].job for r in self.stack.rows]
        items = []
        for item in self.waiting.take(running, self._joins):
            if isinstance(item, JobRecord):
                yield item
            else:
                items.append(item)
        if items:
            self._join(items, t)

    def _joins(self, item) -> bool:
        """Whether a set-up job can join this stack (reading its optimizer's settings if so);
        one that cannot waits for the next stack."""
        p = item[0]
        if not can_share(self.p0, p):
            return False
        try:
            self._check_shapes([p])
            self.opt.add([p])
        except Unbatchable:
            return False
        return True

    def _join(self, items, t: int) -> None:
        ids = list(range(len(self.problems), len(self.problems) + len(items)))
        for p, track, rng in items:
            self.problems.append(p)
            self.pairs.append(group_cap(p.job, self.group_bytes, spec=self.spec) >= 2)
            self.rngs.append(self._rngs(p, rng))
            self.offsets.append(t - (track.step + 1))
            self.begins.append(t)
            self.joined_at[p.job.key] = t
        old = self.stack
        if old is not None:  # the new stack reads the running jobs' buffers from their modules
            for pos, r in enumerate(old.rows):
                self._load_buffers(old, pos, r)
        rows = ([] if old is None else old.rows) + ids
        self.tracker.join([track for _, track, _ in items], len(rows))
        params, slots = self._state(ids)
        if old is not None:
            params = [torch.cat(pair) for pair in zip(old.params, params)]
            slots = {
                k: [torch.cat(pair) for pair in zip(old.slots[k], v)] for k, v in slots.items()
            }
        # rows sorted by sample count, the running ones first among equals
        order = sorted(range(len(rows)), key=lambda k: self.problems[rows[k]].job.hp.N_SAMPLES)
        index = torch.tensor(order, device=self.device)
        params = [x.index_select(0, index) for x in params]
        slots = {k: [x.index_select(0, index) for x in v] for k, v in slots.items()}
        self.stack = self._stack([rows[k] for k in order], (params, slots))

    # -- batches

    def _draw(self, stack: Stack, step: int):
        """The online batch of the run's ``step`` for every job in ``stack``, stacked."""
        Xs, ys = [], []
        for r, offset in zip(stack.rows, stack.offsets):
            p = self.problems[r]
            first = step == self.begins[r]
            if self.uses_global_rng or first:
                self.rngs[r].put()
            X, y = p.batch_fn(step - offset)
            if step == offset:
                check_batch(X, y, p.job.hp.N_SAMPLES, "batch_fn(0)")
                check_finite(X, y, f"job ({p.job.label()}), batch_fn(0)")
            if self.uses_global_rng or first:
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
        if self.dropout:
            seeds = [self._dropout_seed(r) for r in stack.rows]
            steps = [step - o for o in stack.offsets]
            masks = self.kernel.dropout.masks(seeds, steps, stack.params[0])
            losses, grads = self.kernel.loss_and_grads(stack, X, y, f0, masks)
        else:
            losses, grads = self.step_fn(stack, X, y, f0)
        self.opt.step(stack, grads, step)
        return losses

    def _dropout_seed(self, r: int) -> int:
        if r not in self.dropout_seeds:
            self.dropout_seeds[r] = SubSeeds.of(self.problems[r].job.seed).dropout
        return self.dropout_seeds[r]

    # -- the loop

    def _window_end(self, t: int) -> int:
        """The end of the window from the run's step ``t``: at most ``sync_every`` steps, up
        to each row's MAX_ITER and right after its next evaluation step (the curves need the
        state there)."""
        end = t + self.sync_every
        for r, offset in zip(self.stack.rows, self.stack.offsets):
            hp = self.problems[r].job.hp
            end = min(end, offset + hp.MAX_ITER)
            if not hp.ONLYTHRESHOLDS:
                own = t - offset
                end = min(
                    end, offset + (own + hp.EVAL_EVERY - 1) // hp.EVAL_EVERY * hp.EVAL_EVERY + 1
                )
        return end

    def records(self) -> Iterator[JobRecord]:
        """Train until every job of the run (and every one that joins it) has its record."""
        for record in self._records():
            record.joined_at = self.joined_at.get(record.key)
            yield record

    def _records(self) -> Iterator[JobRecord]:
        t = 0
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
            starts = t - stack.offsets[0] if stack.in_step else [t - o for o in stack.offsets]
            self.tracker.consume(starts, torch.stack(window, 1), stack.rows)
            batch = (X, y)
            exits: list[int] = []
            replay: list[int] = []
            for pos, r in enumerate(stack.rows):
                track = self.tracks[r]
                last = t1 - 1 - stack.offsets[pos]  # the job's own last step of the window
                if track.exit is None:
                    if track.eval_due(last):
                        with failure_boundary(
                            track.job, self.device, STACKED, lambda last=last: last
                        ) as failed:  # a failing grab fails its job only
                            self._eval(stack, pos, r, batch, last)
                        if failed.record is not None:
                            track.exit = last
                            exits.append(pos)
                            yield failed.record
                    continue
                exits.append(pos)
                if track.diverged:
                    yield self.tracker.finish(track, self.problems[r], None, STACKED)
                elif track.exit == last:
                    yield self._finish(stack, pos, r, batch)
                else:
                    replay.append(pos)
            if replay:
                yield from self._replay(stack, saved, replay, cache, t)
            if exits:
                keep = [pos for pos in range(len(stack.rows)) if pos not in exits]
                self.stack = stack.take(keep) if keep else None
                for pos in exits:  # a long stream keeps only its running jobs' data
                    r = stack.rows[pos]
                    self.problems[r] = self.tracks[r] = self.rngs[r] = None
                if self.waiting:
                    yield from self._refill(t1)
            t = t1
            if self.stack is not None and self.checkpoints is not None and self.checkpoints.due():
                self._save(self.stack, t - 1)

    def _replay(self, stack: Stack, saved, replay: list[int], cache, t0: int):
        """Rerun the window for the jobs that exited inside it, each up to its exit step."""
        params, slots, buffers = saved
        whole = Stack(
            list(stack.rows),
            params,
            slots,
            stack.hyper,
            {**stack.data, **buffers},
            stack.samples,
            stack.layout,
            stack.offsets,
            stack.init,
        )
        sub = whole.take(replay)
        flat = torch.tensor(stack.layout.take(replay)[1], device=self.device)
        end = max(self.tracks[r].exit + o for r, o in zip(sub.rows, sub.offsets))
        for step in range(t0, end + 1):
            if self.online:
                X, y, f0 = cache[step - t0]
                X, y = X.index_select(0, flat), y.index_select(0, flat)
                f0 = None if f0 is None else f0.index_select(0, flat)
            else:
                X, y, f0 = sub.samples["X"], sub.samples["y"], sub.samples["f0"]
            self._train_step(sub, X, y, f0, step)
            for pos, (r, offset) in enumerate(zip(sub.rows, sub.offsets)):
                if self.tracks[r].exit == step - offset:
                    yield self._finish(sub, pos, r, (X, y))

    def _load_job(self, stack: Stack, pos: int, r: int, step: int, with_opt: bool) -> None:
        """Copy row ``pos`` into the job's own module (and optimizer) for evaluation or saving."""
        p = self.problems[r]
        with torch.no_grad():
            for i, param in enumerate(p.model.parameters()):
                param.copy_(stack.params[i][pos])
        self._load_buffers(stack, pos, r)
        if with_opt:
            self.opt.export(stack, pos, p, self.names, step + 1)

    def _load_buffers(self, stack: Stack, pos: int, r: int) -> None:
        """Copy row ``pos``'s buffers (BatchNorm's running statistics) into the job's module."""
        with torch.no_grad():
            for n, buffer in self.problems[r].model.named_buffers():
                if BUFFER + n in stack.data:
                    buffer.copy_(stack.data[BUFFER + n][pos])

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

    def _save(self, stack: Stack, t: int) -> None:
        """Checkpoint every running job, after the run's step ``t``, in the one-job loop's
        format."""
        for pos, r in enumerate(stack.rows):
            track: Track = self.tracks[r]
            if t < self.begins[r]:
                continue  # it joined at this step: its state is still its start's
            self._load_job(stack, pos, r, t - stack.offsets[pos], with_opt=True)
            if self.rngs[r] is not None:
                self.rngs[r].put()
            seconds = self.tracker.seconds(track)
            self.checkpoints.save(track.job.key, job_state_dict(self.problems[r], track, seconds))
