"""Start a function in one process, in N local workers (`--num-gpus N`), or under `torchrun`."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(use_cuda: bool) -> str:
    return "nccl" if use_cuda else "gloo"


def _worker(local_rank: int, fn: Callable, world_size: int, port: int, use_cuda: bool, args: tuple) -> None:
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(_backend(use_cuda), init_method=f"tcp://127.0.0.1:{port}", world_size=world_size, rank=local_rank)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], num_workers: int, *, use_cuda: bool, args: tuple = ()) -> Any:
    """Run ``fn(*args)`` on every worker. Under torchrun (WORLD_SIZE set) the process group comes from the
    environment; otherwise ``num_workers > 1`` spawns local workers (one GPU each, or CPU processes with gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(_backend(use_cuda), init_method="env://")
        try:
            return fn(*args)
        finally:
            dist.destroy_process_group()
    if num_workers > 1:
        if use_cuda and torch.cuda.device_count() < num_workers:
            raise RuntimeError(f"--num-gpus {num_workers} but only {torch.cuda.device_count()} CUDA device(s) visible")
        mp.spawn(_worker, nprocs=num_workers, args=(fn, num_workers, _free_port(), use_cuda, args), join=True)
        return None
    return fn(*args)
