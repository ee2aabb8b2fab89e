"""The record schema: one definition of a job record's fields drives the run folder's columns,
``Result``, ``to_dataframe`` and ``to_xarray``; how each job trained (``trained_by``) is kept,
counted and reported; run folders written before a field existed still load and resume."""

import sqlite3
from collections import Counter

import numpy as np
import pandas as pd
import torch

from modelscape.cli.args import base_args
from modelscape.results.records import PER_JOB, SQL_COLUMNS, JobRecord
from modelscape.runner import _report_unstacked, main, plan
from modelscape.store import RunStore, describe_sweep, load


def linear_bfn(bsz, gen, X=None, y=None, d=4, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, d, generator=gen)
        return Xb, Xb[:, 0]

    return batch_fn


def config(tmp_path, **overrides):
    hp = dict(WIDTH=8, MAX_ITER=10, N_SAMPLES=16, N_TEST=32, LR=0.05, DEVICES=["cpu"],
              LOSS_CHECKPOINTS=[0.9, 0.5], SAVE_DIR=str(tmp_path / "run"),
              BATCHED="off")  # fmt: skip
    hp.update(overrides)
    return vars(base_args(**hp))


def sweep(cfg, trials):
    return main([trials], ["trial"], cfg, {"base_bfn": linear_bfn}, progress=False)


def record_columns(run_dir):
    with sqlite3.connect(run_dir / "results.sqlite") as conn:
        return [row[1] for row in conn.execute("PRAGMA table_info(records)")]


def test_the_schema_drives_the_columns_the_dataframe_and_the_dataset(tmp_path):
    result = sweep(config(tmp_path), [0, 1, 2])
    assert set(SQL_COLUMNS) <= set(record_columns(tmp_path / "run"))
    assert "trained_by" in SQL_COLUMNS and "trained_by" in PER_JOB
    df = result.to_dataframe()
    assert set(PER_JOB) <= set(df.columns)
    assert list(df["seed"]) == [r.seed for r in result.records]
    ds = result.to_xarray()
    assert set(PER_JOB) <= set(ds.data_vars)
    # 63-bit seeds survive exactly (a float grid would round them)
    assert ds["seed"].dtype == np.int64
    assert [int(s) for s in ds["seed"].values] == [r.seed for r in result.records]
    assert list(ds["steps"].values) == [10, 10, 10]
    assert list(ds["status"].values) == ["ok", "ok", "ok"]


def test_trained_by_is_stored_counted_and_summarised(tmp_path):
    cfg = config(tmp_path)
    names, values, jobs, spec = plan([[0, 1, 2]], ["trial"], cfg, {"base_bfn": linear_bfn})
    ways = ["stacked", "stacked", "single: widths differ"]
    store = RunStore.open(tmp_path / "run", describe_sweep(names, jobs, spec), jobs, values)
    try:
        for job, way in zip(jobs, ways):
            store.add(JobRecord(key=job.key, seed=job.seed, status="ok", trained_by=way))
        assert store.get(jobs[2].key).trained_by == "single: widths differ"
    finally:
        store.close()
    result = load(tmp_path / "run")
    assert [r.trained_by for r in result.records] == ways
    assert result.trained_by == {"stacked": 2, "single: widths differ": 1}
    assert "trained: 2 stacked, 1 single: widths differ" in result.summary()
    assert list(result.to_xarray()["trained_by"].values) == ways


def test_the_runner_says_once_why_jobs_did_not_stack(capsys):
    _report_unstacked(Counter({"stacked": 36, "single: a custom model": 4, "single": 1}))
    err = capsys.readouterr().err
    assert err == "modelscape: 4 of 41 jobs trained one at a time: a custom model\n"
    _report_unstacked(Counter({"stacked": 36, "single": 1}))  # a lone job is no fallback
    assert capsys.readouterr().err == ""


def test_a_run_folder_from_before_trained_by_loads_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = sweep(config(tmp_path), [0, 1])
    with sqlite3.connect(run_dir / "results.sqlite") as conn:  # the previous version's table
        conn.execute("ALTER TABLE records DROP COLUMN trained_by")
    assert "trained_by" not in record_columns(run_dir)
    old = load(run_dir)
    assert [r.trained_by for r in old.records] == ["", ""]
    assert [r.test_loss for r in old.records] == [r.test_loss for r in first.records]
    resumed = sweep(config(tmp_path), [0, 1, 2])  # adds the column, trains only trial 2
    assert "trained_by" in record_columns(run_dir)
    assert [r.test_loss for r in resumed.records[:2]] == [r.test_loss for r in first.records]
    assert resumed.records[2].status == "ok"
    assert len(load(run_dir).records) == 3


def test_a_missing_job_shows_in_every_per_job_variable(tmp_path):
    cfg = config(tmp_path)
    names, values, jobs, spec = plan([[0, 1]], ["trial"], cfg, {"base_bfn": linear_bfn})
    store = RunStore.open(tmp_path / "run", describe_sweep(names, jobs, spec), jobs, values)
    try:
        job = jobs[0]  # trial 1 has no record yet
        store.add(JobRecord(key=job.key, seed=job.seed, status="ok", steps=7, trained_by="single"))
    finally:
        store.close()
    ds = load(tmp_path / "run").to_xarray()
    assert list(ds["status"].values) == ["ok", "missing"]
    assert list(ds["seed"].values) == [jobs[0].seed, None]
    assert ds["trained_by"].values[0] == "single" and pd.isna(ds["trained_by"].values[1])
    assert ds["steps"].values[0] == 7 and np.isnan(ds["seconds"].values[1])


def test_trained_by_is_a_value_with_its_parts_and_stores_as_text():
    from modelscape.results.records import TrainedBy

    why = TrainedBy("single", "jobs differ in WIDTH")
    assert why == "single: jobs differ in WIDTH" and isinstance(why, str)
    assert (why.engine, why.reason) == ("single", "jobs differ in WIDTH")
    assert TrainedBy("stacked").reason is None and TrainedBy("single").engine == "single"
    assert TrainedBy.of(str(why)) == why and TrainedBy.of(str(why)).reason == why.reason
    assert TrainedBy.of("single: a reason: with a colon").reason == "a reason: with a colon"
