"""Process-group set-up and teardown; the only module that initialises torch.distributed.

Everything else takes ``rank`` and ``world_size`` as arguments. Under torchrun the environment
carries RANK / WORLD_SIZE / LOCAL_RANK; without it we run as a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def init(device: str = "auto", timeout_s: int = 1800) -> Dist:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt not in (None, "0") and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # A restart (torchrun --max-restarts) reuses the agent's store; keys of the attempt before (a dead
            # rank's gloo address) left the restarted group waiting forever in connectFullMesh (seen here), so
            # each attempt rendezvouses under a prefix of its own.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                  timeout=timeout)
            kwargs = {"store": dist.PrefixStore(f"pikv/attempt-{attempt}", store), "rank": rank, "world_size": world}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None, **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def print0(*args, **kwargs) -> None:
    if env_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """The sums over ranks of a few numbers (float64, so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()
