"""A run folder records modelscape's version and the engine's numerics version; a resume across
a numerics change is refused before anything trains, naming both versions and the override.

An older engine's folder is made the way it would be found on disk: its stored description
carries another numerics version (or, written before the field existed, none).
"""

import json
import sqlite3

import pytest
import torch

import modelscape
from modelscape import StoreError, run_sweep
from modelscape.backend.cli import base_args
from modelscape.engine import NUMERICS_VERSION
from modelscape.store.sqlite import DB_NAME


def sweep(run, seen, trials=(0, 1), **overrides):
    def bfn(bsz, gen, X=None, y=None, **kwargs):
        def batch_fn(step):
            seen.append(step)
            Xb = torch.randn(bsz, 5, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]

        return batch_fn

    cfg = dict(WIDTH=16, MAX_ITER=20, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
               LOSS_CHECKPOINTS=[1e-9], BATCHED="off", SAVE_DIR=str(run))  # fmt: skip
    cfg.update(overrides)
    return run_sweep(
        [list(trials)], ["trial"], vars(base_args(**cfg)), {"base_bfn": bfn}, progress=False
    )


def rewrite_engine_section(run, section):
    """Leave the folder as an older engine wrote it: another (or no) engine section."""
    with sqlite3.connect(run / DB_NAME) as db:
        (text,) = db.execute("SELECT value FROM meta WHERE name = 'description'").fetchone()
        description = json.loads(text)
        assert description["engine"] == {
            "modelscape": modelscape.__version__,
            "numerics": NUMERICS_VERSION,
        }
        if section is None:
            del description["engine"]
        else:
            description["engine"] = section
        db.execute(
            "UPDATE meta SET value = ? WHERE name = 'description'", (json.dumps(description),)
        )


def test_a_resume_across_a_numerics_version_is_refused_before_training(tmp_path):
    run = tmp_path / "run"
    first = sweep(run, [])
    rewrite_engine_section(run, {"modelscape": "0.0.9", "numerics": NUMERICS_VERSION + 1})
    seen = []
    with pytest.raises(StoreError) as err:
        sweep(run, seen, trials=(0, 1, 2))
    text = str(err.value)
    for named in (str(run), "0.0.9", f"numerics version {NUMERICS_VERSION + 1}",
                  f"numerics version {NUMERICS_VERSION}", "RESUME_CHANGED_CODE=True",
                  "new SAVE_DIR"):  # fmt: skip
        assert named in text, (named, text)
    assert 1 not in seen  # the preflight draws step 0; no training step was drawn
    assert len(modelscape.load(run).records) == 2

    with pytest.warns(UserWarning, match="RESUME_CHANGED_CODE=True adds its results"):
        allowed = sweep(run, seen, trials=(0, 1, 2), RESUME_CHANGED_CODE=True)
    assert len(allowed.records) == 3
    assert [r.test_loss for r in allowed.records[:2]] == [r.test_loss for r in first.records]


def test_a_folder_without_the_field_holds_numerics_version_1(tmp_path):
    """As written before the engine section and D_OUT existed."""
    run = tmp_path / "run"
    sweep(run, [])
    rewrite_engine_section(run, None)
    with sqlite3.connect(run / DB_NAME) as db:
        (text,) = db.execute("SELECT value FROM meta WHERE name = 'description'").fetchone()
        description = json.loads(text)
        assert description["job_hparams"].pop("D_OUT") is None
        db.execute(
            "UPDATE meta SET value = ? WHERE name = 'description'", (json.dumps(description),)
        )
    if NUMERICS_VERSION == 1:
        assert len(sweep(run, [], trials=(0, 1, 2)).records) == 3
    else:
        with pytest.raises(StoreError, match="numerics version 1"):
            sweep(run, [], trials=(0, 1, 2))
