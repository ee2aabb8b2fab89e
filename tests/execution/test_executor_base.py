"""The executor registry and the base class's shared work: a backend overrides only ``_run``."""

import pytest
import torch

from modelscape.cli.args import base_args
from modelscape.engine import train_group
from modelscape.execution import EXECUTORS, REGISTRY, executor_class
from modelscape.execution.base import Executor, executor_for
from modelscape.execution.inprocess import InProcessExecutor
from modelscape.runner import main
from modelscape.sweep import hparams as H


def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 3, generator=gen)
        return Xb, Xb.sum(1)

    return batch_fn


def config(**overrides):
    hp = dict(WIDTH=8, MAX_ITER=5, N_SAMPLES=8, N_TEST=16, DEVICES=["cpu"], BATCHED="off")
    hp.update(overrides)
    return vars(base_args(**hp))


def test_executor_choices_are_the_registry():
    assert H.FIELDS["EXECUTOR"].metadata["choices"] == EXECUTORS == tuple(REGISTRY)
    for name in EXECUTORS:
        assert issubclass(executor_class(name), Executor)
    with pytest.raises(KeyError, match="choose one of local, ray, slurm"):
        executor_class("dask")


def test_one_worker_trains_in_this_process_and_several_in_workers():
    one = executor_for(H.HParams(DEVICES=["cpu"]))
    assert isinstance(one, InProcessExecutor) and not one.pickles
    two = executor_for(H.HParams(DEVICES=["cpu"], WORKERS_PER_DEVICE=2))
    assert type(two) is executor_class("local") and two.pickles
    assert two.placement() == ["cpu", "cpu"]


class FirstJobOnly(Executor):
    """A backend that trains only the first job of each group, in this process."""

    pickles = False

    def _run(self, payload, records):
        for gid, group in enumerate(payload.groups):
            for record in train_group(group[:1], payload.spec, torch.device("cpu")):
                records.add(gid, record)


def test_jobs_a_backend_returns_no_record_for_are_recorded_as_failed():
    result = main(
        [[0, 1, 2]], ["trial"], config(), {"base_bfn": bfn}, executor=FirstJobOnly(), progress=False
    )
    assert [r.status for r in result.records] == ["ok", "ok", "ok"]  # BATCHED=off: groups of 1
    stacked = main(
        [[0, 1, 2]], ["trial"], config(BATCHED="on"), {"base_bfn": bfn},
        executor=FirstJobOnly(), progress=False,
    )  # fmt: skip
    assert [r.status for r in stacked.records] == ["ok", "failed", "failed"]
    assert "FirstJobOnly returned no record for this job" in stacked.records[1].error


def test_an_executors_own_checks_refuse_its_settings_before_the_run_folder_exists(tmp_path):
    """JOB_TIMEOUT on an executor that cannot stop hung jobs, and a SLURM parameter submitit
    does not know, fail in the preflight: no run folder is created, nothing trains."""
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="JOB_TIMEOUT stops hung jobs on local worker"):
        main([[0]], ["trial"], config(EXECUTOR="ray", JOB_TIMEOUT=5, SAVE_DIR=str(run_dir)),
             {"base_bfn": bfn}, progress=False)  # fmt: skip
    assert not run_dir.exists()
    with pytest.raises(H.HParamError, match="'time_limit' is not a submitit parameter"):
        main([[0]], ["trial"], config(EXECUTOR="slurm", SLURM={"time_limit": 5},
             SAVE_DIR=str(run_dir)), {"base_bfn": bfn}, progress=False)  # fmt: skip
    assert not run_dir.exists()
    executor_class("local").check(H.HParams(JOB_TIMEOUT=5))  # local workers do stop them


def test_an_executor_field_set_for_another_executor_is_refused_by_its_schema_metadata(tmp_path):
    tagged = {n: f.metadata["executor"] for n, f in H.FIELDS.items() if f.metadata["executor"]}
    assert tagged == {"SLURM": "slurm", "DETACH": "slurm", "RAY_ADDRESS": "ray"}
    with pytest.raises(H.HParamError, match=r"DETACH=True needs EXECUTOR='slurm'"):
        main([[0]], ["trial"], config(DETACH=True, SAVE_DIR=str(tmp_path / "run")),
             {"base_bfn": bfn}, progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists()
