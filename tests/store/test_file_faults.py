"""Files under faults: corrupt checkpoints, a damaged store, a full or read-only disk, changed code.

Checkpoints are checked before use and a bad one costs only that job's progress. The store's
errors are one ``StoreError`` naming the file and the fix, one unreadable row costs one record,
and a full disk stops the sweep with the records so far intact. A resume with changed code is
refused like a changed hyperparameter.
"""

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from sweeps import config, trial_sweep

from modelscape import SweepError, load, run_sweep
from modelscape.errors import StoreError

REPO = Path(__file__).resolve().parents[2]


def make_bfn(trained=None, at_step=None):
    """x0 * x1 on 5 inputs. ``trained`` collects the trial of every job that trains (that
    draws step 1); ``at_step`` is ``(trial, step, fn)``: ``fn()`` runs when that trial draws
    that step."""

    def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
        def batch_fn(step):
            if trained is not None and step == 1:
                trained.append(trial)
            if at_step is not None and (trial, step) == at_step[:2]:
                at_step[2]()
            Xb = torch.randn(bsz, 5, generator=gen)
            return Xb, Xb[:, 0] * Xb[:, 1]

        return batch_fn

    return bfn


def sweep(cfg, trials=range(3), bfn=None, **kwargs):
    grabs = {"w": lambda model, **kw: model.output_layer.weight}
    return trial_sweep(cfg, trials, bfn or make_bfn(), grabs, **kwargs)


def assert_same_numbers(reference, result):
    assert [r.key for r in reference.records] == [r.key for r in result.records]
    for a, b in zip(reference.records, result.records):
        assert a.status == b.status == "ok", b.error
        assert (a.steps, a.train_loss, a.test_loss) == (b.steps, b.train_loss, b.test_loss)
        assert a.grabs["w"].tobytes() == b.grabs["w"].tobytes()


def modelscape_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "modelscape", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# The code of the sweeps that crash, in a file so that reruns use the very same code. In a
# process with RELIABILITY_KILL_TRIAL set, that trial SIGKILLs its process when it draws step 45
# (after the stacked engine's first checkpoint, at the end of its first 32-step window).
CRASH_DATA = """
import os, signal
import torch

def bfn(bsz, gen, X=None, y=None, trial=0, **kwargs):
    kill = int(os.environ.get("RELIABILITY_KILL_TRIAL", "-1"))

    def batch_fn(step):
        if trial == kill and step == 45:
            os.kill(os.getpid(), signal.SIGKILL)
        Xb = torch.randn(bsz, 5, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1]

    return batch_fn

def w(model, **kwargs):
    return model.output_layer.weight
"""

# A sweep in this process, checkpointing after every step, that dies as a crash or the OOM
# killer would leave it: its run folder holds the records so far and the last checkpoints.
CRASH = """
import sys
from modelscape import base_args, run_sweep
from modelscape.sweep import load_from_file

DATA, SAVE_DIR, BATCHED = sys.argv[1:]
cfg = vars(base_args(WIDTH=16, MAX_ITER=60, N_SAMPLES=32, N_TEST=64, LR=0.05, DEVICES=["cpu"],
                     LOSS_CHECKPOINTS=[1e-9], BATCHED=BATCHED, SAVE_DIR=SAVE_DIR,
                     CHECKPOINT_EVERY=1e-9))
cfg["otherreturns"] = {"w": load_from_file(DATA, "w", "grab")}
run_sweep([[0, 1, 2]], ["trial"], cfg, {"bfn_file": DATA, "bfn_name": "bfn"}, progress=False)
"""


def crash(tmp_path, run, batched="off", kill_trial=1):
    data = tmp_path / "crashdata.py"
    data.write_text(CRASH_DATA)
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RELIABILITY_KILL_TRIAL": str(kill_trial)}
    done = subprocess.run(
        [sys.executable, str(script), str(data), str(run), batched],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr


def after_crash(tmp_path, cfg):
    """The crashed sweep again, with the same code, in this process."""
    from modelscape.sweep import load_from_file

    data = tmp_path / "crashdata.py"
    cfg = {**cfg, "otherreturns": {"w": load_from_file(data, "w", "grab")}}
    bfn_config = {"bfn_file": str(data), "bfn_name": "bfn"}
    return run_sweep([[0, 1, 2]], ["trial"], cfg, bfn_config, progress=False)


# --- checkpoints ---


@pytest.mark.parametrize("damage", ["truncated", "one byte flipped"])
@pytest.mark.parametrize("batched", ["off", "on"])
def test_a_damaged_checkpoint_is_discarded_with_a_warning_and_its_job_restarts(
    tmp_path, damage, batched
):
    run = tmp_path / "run"
    crash(tmp_path, run, batched)
    files = list((run / "checkpoints").glob("*.pt"))
    names = sorted(f.name for f in files)
    # a readable prefix from the job's values, then a hash
    assert any(n.startswith("trial=1") for n in names), names
    target = next(f for f in files if f.name.startswith("trial=1"))
    data = bytearray(target.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # inside the tensors: only a checksum notices
    target.write_bytes(bytes(data))

    cfg = config(BATCHED=batched, SAVE_DIR=str(run), CHECKPOINT_EVERY=1e-9)
    with pytest.warns(UserWarning) as caught:
        result = after_crash(tmp_path, cfg)
    said = [str(w.message) for w in caught if "checkpoint" in str(w.message)]
    assert any("trial=1" in s and str(target) in s and "restarts from step 0" in s for s in said), (
        said
    )
    assert_same_numbers(sweep(config(BATCHED=batched)), result)
    assert not list((run / "checkpoints").glob("*.pt"))


def test_an_intact_checkpoint_is_used_and_leaves_no_temporary_file(tmp_path, capfd):
    run = tmp_path / "run"
    crash(tmp_path, run)
    (target,) = (run / "checkpoints").glob("trial=1*.pt")
    assert not list((run / "checkpoints").glob("*.tmp*"))  # no half-written file left
    capfd.readouterr()
    intact = after_crash(tmp_path, config(SAVE_DIR=str(run), CHECKPOINT_EVERY=1e-9))
    assert "job (trial=1) from its checkpoint at step 44" in capfd.readouterr().err
    assert_same_numbers(sweep(config()), intact)
    assert not target.exists()


# --- the store ---


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_a_damaged_store_gives_one_store_error_naming_the_file_and_the_fix(tmp_path, damage):
    run = tmp_path / "run"
    sweep(config(SAVE_DIR=str(run)))
    db = run / "results.sqlite"
    data = db.read_bytes()
    if damage == "truncated":
        db.write_bytes(data[: len(data) // 2])
    else:
        db.write_bytes(b"this is not a database" * 10 + data[220:])
    for attempt in (lambda: load(run), lambda: sweep(config(SAVE_DIR=str(run)))):
        with pytest.raises(StoreError) as err:
            attempt()
        text = str(err.value)
        assert str(db) in text and "damaged" in text and "new SAVE_DIR" in text
    shown = modelscape_cli("show", str(run))
    assert shown.returncode == 2 and str(db) in shown.stderr
    assert "Traceback" not in shown.stderr


def test_one_corrupt_row_is_reported_and_the_rest_load_then_a_rerun_retrains_it(tmp_path):
    run = tmp_path / "run"
    reference = sweep(config(SAVE_DIR=str(run)))
    with sqlite3.connect(run / "results.sqlite") as conn:
        conn.execute("UPDATE records SET arrays = x'00ff00ff' WHERE key_id = ?", (repr(("1",)),))
    with pytest.warns(UserWarning) as caught:
        loaded = load(run)
    said = [str(w.message) for w in caught]
    assert any("trial=1" in s and "results.sqlite" in s and "Rerun" in s for s in said), said
    assert [r.key for r in loaded.records] == [(0,), (2,)]
    assert list(loaded.to_xarray().status.values) == ["ok", "missing", "ok"]

    trained = []
    with pytest.warns(UserWarning, match="trial=1"):
        rerun = sweep(config(SAVE_DIR=str(run)), bfn=make_bfn(trained))
    assert trained == [1]  # only the unreadable job trained again
    assert_same_numbers(reference, rerun)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size, name)`` mounts a tmpfs of ``size`` (as root); unmounted afterwards."""
    mounted = []

    def mount(size: str, name: str = "disk") -> Path:
        path = tmp_path / name
        path.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(
                f"cannot mount a small tmpfs here ({done.stderr.strip() or 'not root'}); "
                "a full or read-only disk needs one"
            )
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave: int = 0) -> Path:
    """A file taking all free space of ``folder``'s file system except about ``leave`` bytes."""
    filler = folder / "filler"
    if filler.exists():
        return filler
    with open(filler, "wb", buffering=0) as f:  # unbuffered: closing it writes nothing more
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\1" * chunk
            try:
                while not leave or shutil.disk_usage(folder).free - chunk >= leave:
                    f.write(block)
            except OSError:
                continue
    return filler


def test_a_full_disk_stops_the_sweep_cleanly_with_the_records_so_far_intact(small_disk):
    disk = small_disk("8m")
    run = disk / "run"
    filled = []
    bfn = make_bfn(at_step=(2, 0, lambda: filled.append(fill(disk))))
    with pytest.raises(StoreError) as err:
        sweep(config(SAVE_DIR=str(run)), trials=range(5), bfn=bfn)
    text = str(err.value)
    assert "full" in text and str(run) in text and "Free space" in text and "rerun" in text
    assert "2 finished jobs are stored" in text
    assert [r.key for r in load(run).records] == [(0,), (1,)]

    # a rerun on the still full disk says so, not "cannot rollback"
    with pytest.raises(StoreError) as err:
        sweep(config(SAVE_DIR=str(run)), trials=range(5))
    assert "full" in str(err.value) and "rollback" not in str(err.value)

    filled[0].unlink()
    trained = []
    done = sweep(config(SAVE_DIR=str(run)), trials=range(5), bfn=make_bfn(trained))
    assert trained == [2, 3, 4] and [r.status for r in done.records] == ["ok"] * 5


def test_a_checkpoint_never_takes_the_last_free_space_from_results(small_disk):
    disk = small_disk("96m")
    fill(disk, leave=16 << 20)
    run = disk / "run"
    with pytest.warns(UserWarning, match=r"skipping checkpoints.*free") as caught:
        result = sweep(config(SAVE_DIR=str(run), CHECKPOINT_EVERY=1e-9))
    assert [r.status for r in result.records] == ["ok"] * 3
    assert len([w for w in caught if "skipping checkpoints" in str(w.message)]) == 1
    assert str(run) in str(caught[0].message)


def test_a_save_dir_that_is_a_file_or_read_only_is_a_store_error(tmp_path, small_disk):
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(StoreError) as err:
        sweep(config(SAVE_DIR=str(a_file)))
    assert str(a_file) in str(err.value) and "not a folder" in str(err.value)
    assert "another SAVE_DIR" in str(err.value)
    done = modelscape_cli("run", "--SAVE_DIR", str(a_file))
    assert done.returncode == 2 and "not a folder" in done.stderr
    assert "Traceback" not in done.stderr

    disk = small_disk("4m")
    finished = disk / "finished"
    reference = sweep(config(SAVE_DIR=str(finished)))
    remount = ["mount", "-o", "remount,ro", str(disk)]
    subprocess.run(remount, check=True, capture_output=True)
    with pytest.raises(StoreError) as err:
        sweep(config(SAVE_DIR=str(disk / "new")))
    text = str(err.value)
    assert str(disk / "new") in text and "read-only" in text and "another SAVE_DIR" in text
    # a finished run folder on a read-only disk still loads
    assert_same_numbers(reference, load(finished))


def test_a_store_copied_without_its_wal_file_says_so(tmp_path):
    run = tmp_path / "run"
    crash(tmp_path, run, kill_trial=2)  # killed: the records are still in results.sqlite-wal
    assert (run / "results.sqlite-wal").is_file()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(run / "results.sqlite", copy / "results.sqlite")
    assert [r.key for r in load(run).records] == [(0,), (1,)]  # the whole folder loads
    with pytest.raises(StoreError) as err:
        load(copy)
    text = str(err.value)
    assert "results.sqlite-wal" in text and "is missing" in text and str(copy) in text


# --- the code ---

DATA_V1 = """
import torch

def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 5, generator=gen)
        return Xb, Xb[:, 0] * Xb[:, 1]
    return batch_fn

def norm(model, **kwargs):
    return model.output_layer.weight.norm()
"""


def code_sweep(folder, run, **overrides):
    from modelscape.sweep import load_from_file

    data = folder / "data.py"
    grab = load_from_file(data, "norm", "grab")
    cfg = {**config(SAVE_DIR=str(run), **overrides), "otherreturns": {"norm": grab}}
    bfn_config = {"bfn_file": str(data), "bfn_name": "bfn"}
    return run_sweep([[0, 1]], ["trial"], cfg, bfn_config, progress=False)


@pytest.mark.parametrize(
    "change, named",
    [
        (("Xb[:, 0] * Xb[:, 1]", "Xb[:, 0] + Xb[:, 1]"), "batch function"),
        (("weight.norm()", "weight.abs().sum()"), "grab 'norm'"),
    ],
)
def test_a_resume_with_changed_code_is_refused_unless_allowed(tmp_path, change, named):
    run = tmp_path / "run"
    (tmp_path / "data.py").write_text(DATA_V1)
    first = code_sweep(tmp_path, run)
    again = code_sweep(tmp_path, run)  # the same code resumes (and has nothing left to do)
    assert [r.test_loss for r in again.records] == [r.test_loss for r in first.records]

    (tmp_path / "data.py").write_text(DATA_V1.replace(*change))
    with pytest.raises(SweepError) as err:
        code_sweep(tmp_path, run)
    text = str(err.value)
    assert str(run) in text and named in text and "RESUME_CHANGED_CODE=True" in text
    assert "new SAVE_DIR" in text
    allowed = code_sweep(tmp_path, run, RESUME_CHANGED_CODE=True)
    assert [r.test_loss for r in allowed.records] == [r.test_loss for r in first.records]


def test_a_changed_model_class_is_refused_on_resume(tmp_path):
    model = tmp_path / "net.py"
    source = textwrap.dedent(
        """
        from torch import nn

        class Net(nn.Module):
            def __init__(self, d_in, d_out, width):
                super().__init__()
                self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
                self.output_layer = nn.Linear(width, d_out)

            def forward(self, x):
                return self.output_layer(self.body(x))
        """
    )
    model.write_text(source)
    cfg = config(SAVE_DIR=str(tmp_path / "run"), MODEL_CLASS=f"{model}:Net")
    sweep(cfg, trials=[0])
    model.write_text(source.replace("nn.ReLU()", "nn.Tanh()"))
    with pytest.raises(SweepError, match=r"(?s)model Net.*RESUME_CHANGED_CODE=True"):
        sweep(cfg, trials=[0])
