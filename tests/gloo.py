"""Run a function on N gloo ranks on loopback and collect what each rank returns.

``run_gloo(fn, world_size, *args)`` spawns ``world_size`` fresh processes, initializes a gloo process
group over TCP on 127.0.0.1, calls ``fn(rank, world_size, *args)`` in each (``fn`` must be a module-level
function so the spawned process can import it) and returns the ranks' return values (saved with
``torch.save``), in rank order. A rank that raises fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        try:
            torch.save(fn(rank, world_size, *args), out / f"rank{rank}.pt")
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_gloo(fn, world_size: int = 2, *args) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, out_dir, fn, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(TIMEOUT_S)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = [(Path(out_dir) / f"rank{r}.err") for r in range(world_size)]
        failed = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists()]
        if failed or any(p.exitcode != 0 for p in procs):
            codes = [p.exitcode for p in procs]
            raise RuntimeError(f"gloo ranks failed (exit codes {codes})\n" + "\n".join(failed))
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
