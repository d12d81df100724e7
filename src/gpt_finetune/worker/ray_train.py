"""One job trained data-parallel across Ray workers: the Ray job's entrypoint for a job with
``num_processes`` > 1 on the Ray executor (``worker.ray_executor``).

Ray Train (``TorchTrainer``) places the job's processes, one Ray Train worker each, on whatever
nodes of the cluster have what each asks for (a CPU, ``--gpus`` GPUs, the memory plan's peak),
starts them together or not at all, and tears the whole group down when any of them fails.
Each Ray Train worker then runs the job's ordinary training process (``worker.train_job``, the
command a local worker runs) with the environment ``accelerate launch`` would have given it:
its rank, the world size, and a rendezvous address on the rank-0 worker's node. So the training
itself, and everything it writes (events, checkpoints, the model, rank 0 only), is the same
code as on one machine; Ray decides only where each process runs.

Why the training runs as a child of the Ray Train worker rather than in it: the process keeps
the allocator it is started on (``allocator.allocator_env``: tcmalloc preloaded, on the node it
runs on), its memory is freed when it ends, and it is killed with the worker
(PR_SET_PDEATHSIG) when Ray stops the group. Ray Train's own process group (gloo) is used once,
to hand every worker the rendezvous port rank 0 picked; the training makes its own (gloo on
CPU, NCCL on GPUs) as accelerate does. The measurements behind the choice are in
bench/README.md ("Data-parallel on Ray").
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

from ..settings import from_env
from .allocator import allocator_env
from .runner import _die_with_parent

TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def train_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the job's training process at its rank."""
    import ray
    from ray.train import get_context
    from ray.train.collective import broadcast_from_rank_zero

    ctx = get_context()
    rank = ctx.get_world_rank()
    here = {"addr": ray.util.get_node_ip_address(), "port": _free_port()} if rank == 0 else None
    there = broadcast_from_rank_zero(here)  # also a barrier: every process starts together
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        NODE_RANK=str(ctx.get_node_rank()),
        MASTER_ADDR=str(there["addr"]),
        MASTER_PORT=str(there["port"]),
        PYTHONUNBUFFERED="1",
    )
    env.update(allocator_env(env, from_env("malloc", env)))
    command = [sys.executable, "-m", "gpt_finetune.worker.train_job", "--runner-pid", str(os.getpid())]
    rc = subprocess.call(command + list(config["argv"]), env=env, preexec_fn=_die_with_parent)
    if rc != 0:  # Ray Train stops the other processes and the Ray job fails: the worker requeues it
        raise RuntimeError(f"the training process of rank {rank} exited with status {rc}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpt_finetune.worker.ray_train")
    ap.add_argument("--processes", type=int, required=True, help="Ray Train workers, one training process each")
    ap.add_argument("--gpus", type=float, default=0, help="GPUs each process asks Ray for (0: CPU, gloo)")
    ap.add_argument("--memory-gb", type=float, default=0, help="memory each process asks Ray for")
    ap.add_argument("--name", required=True, help="the Ray Train run's name (the submission id)")
    ap.add_argument("--storage", required=True, help="where Ray Train keeps the run's state")
    ap.add_argument("train_job_args", nargs=argparse.REMAINDER, help="after --: the training process's arguments")
    args = ap.parse_args(argv)
    rest = args.train_job_args[1:] if args.train_job_args[:1] == ["--"] else args.train_job_args
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources: dict[str, float] = {"CPU": 1}
    if args.gpus:
        resources["GPU"] = args.gpus
    if args.memory_gb:
        resources["memory"] = int(args.memory_gb * 1e9)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"argv": rest},
        scaling_config=ScalingConfig(
            num_workers=args.processes, use_gpu=bool(args.gpus), resources_per_worker=resources
        ),
        # Ray's group only hands out the rendezvous port: gloo everywhere, cheapest to start
        torch_config=TorchConfig(backend="gloo"),
        # a failed attempt goes back to the store's queue (the worker requeues or fails it from
        # its last checkpoint, counting attempts); Ray retrying it too would count twice
        run_config=RunConfig(name=args.name, storage_path=args.storage, failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()  # raises when a process failed: the Ray job ends FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
