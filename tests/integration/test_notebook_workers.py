"""A real notebook, run by a Jupyter kernel, trains notebook-defined functions on 2 workers."""

import json
import os

import pytest
import torch

from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.cli.args import base_args

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

DEFINE = """
import json, os, torch
from modelscape import base_args, run_sweep

shift = 0.5  # the batch function closes over a notebook variable

def bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, torch.tanh(Xb[:, 0] + shift)
    return batch_fn

def readout_norm(model, **kwargs):
    return float(model.output_layer.weight.detach().norm())

def pid(**kwargs):
    return os.getpid()
"""

RUN = """
args = base_args(WIDTH=16, MAX_ITER=40, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"],
                 WORKERS_PER_DEVICE=2, LOSS_CHECKPOINTS=[1e-9], BATCHED="off")
args.otherreturns = {"norm": readout_norm, "pid": pid}
result = run_sweep([range(2), [1.0, 0.5]], ["trial", "GAMMA"], args, {"base_bfn": bfn},
                   progress=False)
print(json.dumps({
    "kernel_pid": os.getpid(),
    "records": [[list(r.key), r.status, r.test_loss.hex(), float(r.grabs["norm"]).hex(),
                 int(r.grabs["pid"])] for r in result.records],
}))
"""


def reference_bfn(bsz, gen, X=None, y=None, **kwargs):
    def batch_fn(step):
        Xb = torch.randn(bsz, 4, generator=gen)
        return Xb, torch.tanh(Xb[:, 0] + 0.5)

    return batch_fn


def test_notebook_defined_batch_function_and_grab_run_on_two_workers(tmp_path, monkeypatch):
    # a kernelspec for this interpreter, so the kernel imports this checkout of modelscape
    kernelspec.install(kernel_name="modelscape-test", prefix=str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(DEFINE), nbformat.v4.new_code_cell(RUN)]
    client = nbclient.NotebookClient(
        nb,
        kernel_name="modelscape-test",
        timeout=180,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [o for o in nb.cells[1].outputs if o.get("name") == "stdout"]
    report = json.loads(outputs[-1]["text"].strip().splitlines()[-1])

    cfg = vars(base_args(WIDTH=16, MAX_ITER=40, N_SAMPLES=16, N_TEST=32, DEVICES=["cpu"],
                         LOSS_CHECKPOINTS=[1e-9], BATCHED="off"))  # fmt: skip
    grab = {"norm": lambda model, **kw: float(model.output_layer.weight.detach().norm())}
    reference = run_job_iterator(
        [range(2), [1.0, 0.5]],
        ["trial", "GAMMA"],
        {**cfg, "otherreturns": grab},
        {"base_bfn": reference_bfn},
        progress=False,
    )
    got = report["records"]
    assert [tuple(k) for k, *_ in got] == [r.key for r in reference.records]
    for (_, status, test_loss, norm, _), ref in zip(got, reference.records):
        assert status == "ok"
        assert float.fromhex(test_loss) == ref.test_loss  # bit for bit
        assert float.fromhex(norm) == float(ref.grabs["norm"])
    worker_pids = {p for *_, p in got}
    assert len(worker_pids) == 2 and report["kernel_pid"] not in worker_pids
    assert os.getpid() not in worker_pids
