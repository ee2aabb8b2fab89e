"""The import paths and stored files from before the package layout still work: every module
path the README documented or the original's scripts import, and run folders, checkpoints,
pickled results and a detached SLURM sweep's pickles written by the code before the move
(``tests/fixtures/stored_before_layout``)."""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from modelscape import load
from modelscape.execution.pickling import loads
from modelscape.store.checkpoints import Checkpoints

STORED = Path(__file__).parents[1] / "fixtures" / "stored_before_layout"
EXPECTED = json.loads((STORED / "expected.json").read_text())

# old path -> names it must still provide (and where they live now)
OLD_PATHS = {
    "modelscape.backend.cli": ["parse_args", "base_args"],
    "modelscape.backend.job_iterator": ["main"],
    "modelscape.backend.utils": ["ensure_torch", "ensure_numpy", "seed_everything"],
    "modelscape.model": ["MLP", "SimpleCNN", "SimpleTransformer", "CenteredWrapper"],
    "modelscape.hparams": ["HParams", "PARAMETRIZATIONS", "markdown_table"],
    "modelscape.jobs": ["Job", "build_jobs", "AXIS_ALIASES"],
    "modelscape.records": ["JobRecord", "Status"],
    "modelscape.results": ["Result", "JobRecord"],
    "modelscape.trace": ["ExptTrace"],
    "modelscape.sweep": ["SweepSpec", "load_from_file"],
    "modelscape.models": ["MLP", "CNN", "ResNet", "Transformer"],
    "modelscape.parametrize": ["OPTIMIZER_RULES", "mupify", "rescale"],
    "modelscape.plotting": ["learning_curve", "time_to_threshold"],
    "modelscape.legacy_names": ["DEPRECATED_NAMES"],
    "modelscape.data.data": ["get_powerlaw_target"],
    "modelscape.data.monomial": ["Monomial"],
    "modelscape.data.mlp_grabs": ["get_Win"],
    "modelscape.data.ntk_coeffs": [],
}
NEW_HOME = {
    "modelscape.hparams": "modelscape.sweep.hparams",
    "modelscape.jobs": "modelscape.sweep.jobs",
    "modelscape.records": "modelscape.results.records",
    "modelscape.trace": "modelscape.results.trace",
    "modelscape.parametrize": "modelscape.models.parametrize",
    "modelscape.plotting": "modelscape.results.plotting",
    "modelscape.backend.cli": "modelscape.cli.args",
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_an_old_import_path_still_gives_its_names(path):
    module = importlib.import_module(path)
    for name in OLD_PATHS[path]:
        assert hasattr(module, name), f"{path}.{name}"
    if path in NEW_HOME:  # the same objects, not copies
        new = importlib.import_module(NEW_HOME[path])
        for name in OLD_PATHS[path]:
            assert getattr(module, name) is getattr(new, name)


def test_a_run_folder_written_before_the_move_loads_with_its_numbers():
    result = load(STORED / "finished")
    got = {repr(r.key): [r.seed, r.test_loss, r.train_loss] for r in result.records}
    assert got == EXPECTED["finished"]
    ds = result.to_xarray()
    assert float(ds.test_loss.sel(ntrain=16, trial=0)) == EXPECTED["finished"]["(16, 0)"][1]


def test_a_pickled_result_from_before_the_move_unpickles():
    result = pickle.loads((STORED / "result.pkl").read_bytes())
    assert {repr(r.key): r.test_loss for r in result.records} == {
        k: v[1] for k, v in EXPECTED["finished"].items()
    }


def test_a_checkpoint_from_before_the_move_restores_its_step_and_seed(tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(STORED / "killed" / "checkpoints", folder)
    state = Checkpoints(folder, 1.0, axes=("ntrain", "trial")).load((8, 0))
    assert state is not None
    assert int(state["step"]) == EXPECTED["checkpoint"]["step"]
    assert state["seed"] == EXPECTED["checkpoint"]["seed"]


def test_a_detached_slurm_sweeps_pickled_jobs_and_record_load():
    jobs = loads((STORED / "slurm_group.pkl").read_bytes())
    assert [[repr(j.key), j.seed, j.hp.N_SAMPLES] for j in jobs] == EXPECTED["slurm_group"]
    record = loads((STORED / "slurm_record.pkl").read_bytes())
    assert [repr(record.key), record.seed, record.test_loss] == EXPECTED["slurm_record"]
