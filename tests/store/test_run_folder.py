"""The run folder (SAVE_DIR): lossless records, resuming, refusing changed settings, load()."""

import json
import os
import sqlite3

import numpy as np
import pytest
import torch
from sweeps import quadratic_bfn

from modelscape import SweepError
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args
from modelscape.store import load

SEEN = []  # trials whose batch function was built, in this process (the sweeps run in-process)


def gaussian_bfn(bsz, gen, X=None, y=None, d=5, trial=0, **kwargs):
    SEEN.append(trial)

    def batch_fn(step):
        Xb = torch.randn(bsz, d, generator=gen)
        if trial == 99:
            raise RuntimeError("trial 99 is broken on purpose")
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn


def config(tmp_path, **overrides):
    hp = dict(WIDTH=8, MAX_ITER=30, N_SAMPLES=16, N_TEST=32, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[0.9, 0.5], SAVE_DIR=str(tmp_path / "run"),
              BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def run(cfg, trials, bfn_kwargs=None, **extra):
    return run_job_iterator(
        [trials, [1.0, 0.5]],
        ["trial", "GAMMA"],
        {**cfg, **extra},
        {"base_bfn": gaussian_bfn, **(bfn_kwargs or {})},
        progress=False,
    )


def assert_same_records(a, b):
    assert [r.key for r in a.records] == [r.key for r in b.records]
    for ra, rb in zip(a.records, b.records):
        assert (ra.status, ra.seed, ra.steps, ra.error) == (rb.status, rb.seed, rb.steps, rb.error)
        np.testing.assert_array_equal(ra.train_loss, rb.train_loss)
        np.testing.assert_array_equal(ra.test_loss, rb.test_loss)
        np.testing.assert_array_equal(ra.timekeys, rb.timekeys)
        assert ra.grabs.keys() == rb.grabs.keys()
        for k in ra.grabs:
            assert ra.grabs[k].dtype == rb.grabs[k].dtype
            np.testing.assert_array_equal(ra.grabs[k], rb.grabs[k])
        assert (ra.curves is None) == (rb.curves is None)
        for k in ra.curves or {}:
            np.testing.assert_array_equal(ra.curves[k], rb.curves[k])


def weights(model, **kwargs):
    return torch.cat([p.detach().flatten() for p in model.parameters()])[:7].double()


def test_records_round_trip_losslessly_with_curves_grabs_and_failures(tmp_path):
    cfg = config(tmp_path, ONLYTHRESHOLDS=False, EVAL_EVERY=7)
    result = run(cfg, [0, 99], otherreturns={"w": weights})
    loaded = load(tmp_path / "run")
    assert_same_records(result, loaded)
    ok = loaded.record(0, 1.0)
    assert ok.status == "ok" and ok.curves["w"].shape == (30, 7)
    assert ok.curves["w"].dtype == np.float64 and ok.timekeys.dtype == np.float64
    # bits, not just approximately: the stored float64 equals the trained one exactly
    assert ok.curves["train_loss"].tobytes() == result.record(0, 1.0).curves["train_loss"].tobytes()
    bad = loaded.record(99, 0.5)
    assert bad.status == "failed" and "trial 99 is broken on purpose" in bad.error
    assert "Traceback" in bad.traceback and "in batch_fn" in bad.traceback
    assert loaded["errors"].keys() == result["errors"].keys()
    xr_a, xr_b = result.to_xarray(), loaded.to_xarray()
    np.testing.assert_array_equal(xr_a["test_loss"].values, xr_b["test_loss"].values)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["axes"] == ["trial", "GAMMA"]
    assert stored["job_hparams"]["LR"] == 0.05 and "GAMMA" not in stored["job_hparams"]
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (4,)
        assert conn.execute("SELECT count(*) FROM records").fetchone() == (4,)


def test_rerun_trains_only_missing_jobs_and_extends_the_sweep(tmp_path):
    cfg = config(tmp_path)
    seen = SEEN
    seen.clear()
    first = run(cfg, [0, 1])
    # 2 preflight calls (training and test batch) + 2 draws (test, train) per job
    assert sorted(seen) == [0] * 6 + [1] * 4
    seen.clear()
    again = run(cfg, [0, 1])
    assert seen == [0, 0]  # only the preflight calls: every job was already stored
    assert_same_records(first, again)
    seen.clear()
    extended = run(cfg, [0, 1, 2])
    assert sorted(seen) == [0, 0, 2, 2, 2, 2]
    assert [r.key for r in extended.records] == [(t, g) for t in (0, 1, 2) for g in (1.0, 0.5)]
    fresh = run(config(tmp_path, SAVE_DIR=str(tmp_path / "fresh")), [0, 1, 2])
    assert_same_records(extended, fresh)
    assert load(tmp_path / "run").axis_values == [[0, 1, 2], [1.0, 0.5]]


def test_failed_jobs_rerun_only_with_retry_failed(tmp_path):
    cfg = config(tmp_path)
    seen = SEEN
    run(cfg, [0, 99])
    seen.clear()
    run(cfg, [0, 99])
    assert seen == [0, 0]
    seen.clear()
    run({**cfg, "RETRY_FAILED": True}, [0, 99])
    assert sorted(seen) == [0, 0, 99, 99]  # preflight, then each failed job (test draw raises)


def test_changed_job_hyperparameter_is_refused_with_what_differs(tmp_path):
    cfg = config(tmp_path)
    run(cfg, [0], CLASSES=[0, 6])
    with pytest.raises(SweepError) as err:
        run({**cfg, "LR": 0.1, "WIDTH": 9}, [0], CLASSES=[0, 6])
    text = str(err.value)
    assert "LR: 0.05 in the run folder, 0.1 now" in text and "WIDTH: 8 in the run folder, 9" in text
    assert "new SAVE_DIR" in text
    with pytest.raises(SweepError, match=r"CLASSES: \[0, 6\] in the run folder, \[0, 7\] now"):
        run(cfg, [0], CLASSES=[0, 7])
    with pytest.raises(SweepError, match="d: not set in the run folder, 6 now"):
        run(cfg, [0], {"d": 6}, CLASSES=[0, 6])
    with pytest.raises(SweepError, match="axes"):
        run_job_iterator([[0]], ["trial"], cfg, {"base_bfn": gaussian_bfn}, progress=False)
    # sweep-scope settings may change between a run and its resumption
    resumed = run({**cfg, "CHECKPOINT_EVERY": 5.0, "WORKERS_PER_DEVICE": 1}, [0], CLASSES=[0, 6])
    assert len(resumed.records) == 2


def load_count(model, SAVE_DIR, **kwargs):
    return len(load(SAVE_DIR).records)


def test_load_reads_a_consistent_snapshot_while_the_sweep_writes(tmp_path):
    # the grab runs at the end of each job, before its record is written: job i sees i records
    result = run(config(tmp_path), [0, 1, 2], otherreturns={"n_loaded": load_count})
    assert [int(r.grabs["n_loaded"]) for r in result.records] == [0, 1, 2, 3, 4, 5]


def test_a_second_writer_is_refused(tmp_path):
    cfg = config(tmp_path)

    def nested(model, **kwargs):
        run(cfg, [0])
        return 0

    # the preflight calls the grab once, before training, while the outer sweep holds the folder
    with pytest.raises(SweepError, match="grab 'nested'.*another sweep is writing to SAVE_DIR"):
        run(cfg, [0], otherreturns={"nested": nested})


def test_load_names_the_fix_for_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a modelscape run folder"):
        load(tmp_path)


@pytest.mark.parametrize("to_array", [lambda t: t, lambda t: t.numpy()], ids=["tensor", "ndarray"])
def test_changed_row_of_an_array_user_key_is_refused(tmp_path, to_array):
    # a repr of a 2000-row pool elides its middle, so only a digest of the bytes sees this row
    pool = torch.randn(2000, 5, generator=torch.Generator().manual_seed(0))
    cfg = config(tmp_path)
    run(cfg, [0], POOL=to_array(pool.clone()))
    changed = pool.clone()
    changed[1000] += 1.0
    with pytest.raises(SweepError, match=r"POOL: '(tensor|ndarray)\(2000, 5\) .*sha256:"):
        run(cfg, [0], POOL=to_array(changed))
    resumed = run(cfg, [0], POOL=to_array(pool.clone()))
    assert len(resumed.records) == 2


def chdir_bfn(bsz, gen, X=None, y=None, elsewhere=None, **kwargs):
    os.chdir(elsewhere)  # user code that changes the working directory mid-sweep
    return quadratic_bfn(bsz, gen, X, y)


def test_a_relative_save_dir_survives_user_code_that_changes_directory(tmp_path, monkeypatch):
    """SAVE_DIR is resolved when the folder opens: a batch function's chdir is not mistaken
    for a deleted run folder, and the records land where the sweep started."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    hp = base_args(WIDTH=8, MAX_ITER=5, N_SAMPLES=8, N_TEST=8, DEVICES=["cpu"], SAVE_DIR="runs/rel")
    cfg = {**vars(hp), "elsewhere": str(tmp_path / "elsewhere")}
    result = run_job_iterator([range(2)], ["trial"], cfg, {"base_bfn": chdir_bfn}, progress=False)
    assert [r.status for r in result.records] == ["ok", "ok"]
    assert [r.test_loss for r in load(tmp_path / "runs" / "rel").records] == [
        r.test_loss for r in result.records
    ]
