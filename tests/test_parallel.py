"""Collectives of elastic/parallel.py on 2 real gloo processes: every rank takes part in every collective, whatever
gradients it happens to hold (a rank that skipped an all_reduce the others entered would desynchronise them: wrong sums
on gloo, a hang or silent corruption on NCCL)."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    from elastic.parallel import average_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    router = torch.nn.Parameter(torch.zeros(3))   # rank 0 drew a budget micro-batch, rank 1 only full-model ones
    shared = torch.nn.Parameter(torch.zeros(2))   # both ranks have a gradient
    unused = torch.nn.Parameter(torch.zeros(4))   # no rank has a gradient
    router.grad = torch.tensor([2.0, 4.0, 6.0]) if rank == 0 else None
    shared.grad = torch.full((2,), float(rank + 1))
    average_gradients([router, shared, unused])
    # a second collective after it: with a skipped all_reduce on one rank, this one pairs with the wrong call
    probe = torch.tensor([float(rank + 1)])
    dist.all_reduce(probe)
    torch.save({"router": router.grad, "shared": shared.grad, "unused": unused.grad, "probe": probe},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_average_gradients_keeps_ranks_in_step_when_one_rank_has_no_gradient(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for r in (r0, r1):
        # DDP's semantics: a missing gradient counts as zero in the average over all ranks
        torch.testing.assert_close(r["router"], torch.tensor([1.0, 2.0, 3.0]))
        torch.testing.assert_close(r["shared"], torch.full((2,), 1.5))
        assert r["unused"] is None  # no rank had one: the optimizer still skips it
        assert r["probe"].item() == 3.0
