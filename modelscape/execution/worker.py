"""A worker process of the local executor (``LocalExecutor`` starts it; not for direct use).

The worker is a fresh interpreter or a fork of the parent (``starting.py``): it never re-runs
the user's script, so scripts need no ``if __name__ == "__main__"`` guard and nobody calls
``mp.set_start_method``. It listens on a
private address that it prints on stdout, receives the sweep (cloudpickled) once, then trains
the groups of jobs it is sent one at a time, sending each record back as soon as it exists.
It exits when told to stop, when the connection closes, or when its parent dies.

Messages to the parent: ``("ready", pid)``, ``("fatal", traceback)`` (the sweep does not load),
``("record", gid, record)``, ``("group_error", gid, traceback)`` and ``("done", gid)``.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from multiprocessing.connection import Connection, Listener
from typing import Any

AUTHKEY_ENV = "MODELSCAPE_WORKER_AUTHKEY"


def _exit_with_parent(parent_pid: int) -> None:
    # A parent killed with SIGKILL cannot stop its workers; they notice being orphaned here
    # (even in the middle of a long job) instead of training on for nobody.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _serve(conn: Connection, inherited: Any = None) -> None:
    # imported here: the worker prints its address before the slow torch import
    import torch

    from modelscape.engine import train_group
    from modelscape.engine.failures import mark_worker_process
    from modelscape.execution.base import join_sys_path

    mark_worker_process()  # no terminal reaches a worker: every exit here is user code
    from modelscape.execution.pickling import loads

    init = conn.recv()
    join_sys_path(init["sys_path"])
    torch.set_num_threads(init["threads"])
    device = torch.device(init["device"])
    try:
        spec = loads(init["spec"]) if init["spec"] else inherited
    except Exception:  # noqa: BLE001 - reported to the parent, which stops the sweep
        conn.send(("fatal", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        gid, blob = message
        try:
            group = loads(blob)
            for record in train_group(group, spec, device, init["checkpoints"]):
                conn.send(("record", gid, record))
        except Exception:  # noqa: BLE001 - the group's unfinished jobs become failed records
            conn.send(("group_error", gid, traceback.format_exc()))
        conn.send(("done", gid))


def main(authkey: bytes | None = None, spec: Any = None) -> None:
    """Serve one sweep: ``authkey`` and the ``spec`` from a forked parent, else the key from
    the environment and the spec pickled from the parent."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if authkey is None:
        authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
    with Listener(authkey=authkey) as listener:
        print(listener.address, flush=True)
        os.dup2(2, 1)  # from here on, the worker's prints go to the parent's stderr
        conn = listener.accept()
    try:
        _serve(conn, spec)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent went away
    finally:
        conn.close()
