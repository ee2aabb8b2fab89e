"""Checkpoint files and temporaries: one file per job identity, whatever form its values take;
checkpoints written before files were named by that identity still resume; a temporary file is
cleared only when its writer is gone from this host."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from modelscape.store.checkpoints import Checkpoints
from modelscape.store.files import _HOST, remove_stale_temporaries, write_checked


def test_equal_values_in_other_forms_name_one_checkpoint(tmp_path):
    """``np.float64(0.1)`` (an np.linspace axis) and ``0.1`` (after ``.tolist()``) are one job
    with one seed and one stored record, so they are one checkpoint: a resume after switching
    forms continues the job, and storing its record clears the file."""
    ck = Checkpoints(tmp_path, 1.0, axes=("lr", "trial"))
    ck.save((np.float64(0.1), 0), {"step": 7})
    assert ck.load((0.1, 0)) == {"step": 7}
    ck.clear((0.1, 0))
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_named_the_old_way_still_resumes_and_is_cleared(tmp_path):
    """Files written before checkpoints were named by ``key_id`` (a digest of ``repr(key)``,
    the key's repr inside) are found, loaded and cleared."""
    import hashlib
    import io

    import torch

    key = (8, 0)
    buf = io.BytesIO()
    torch.save({"key": repr(key), "state": {"step": 3}}, buf)
    old = tmp_path / f"ntrain=8,trial=0--{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.pt"
    write_checked(old, buf.getvalue())
    ck = Checkpoints(tmp_path, 1.0, axes=("ntrain", "trial"))
    assert ck.load(key) == {"step": 3}
    ck.clear(key)
    assert not old.exists()


def test_only_temporaries_of_dead_writers_on_this_host_are_cleared(tmp_path):
    """A SLURM task on another node may be writing into the shared folder: its temporary file
    is kept even though no process of that id runs here."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    mine = tmp_path / f".a.pt.tmp-{_HOST}-{pid}"
    legacy = tmp_path / f"b.pt.tmp{pid}"  # the name before writers named their host
    other_host = tmp_path / f".c.pt.tmp-node17-{pid}"
    alive = tmp_path / f".d.pt.tmp-{_HOST}-{os.getpid()}"
    for path in (mine, legacy, other_host, alive):
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([mine, legacy])
    assert other_host.exists() and alive.exists()
