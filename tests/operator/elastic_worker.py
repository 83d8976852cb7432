"""A stand-in trainer for the elastic rendezvous test: joins the process group torchrun set up
(gloo on CPU), runs `steps` all-reduces one per 0.2 s and appends one line per step to
OUT/rank-R.log with the restart count, so the test can see who restarted and who finished."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    log = Path(out) / f"rank-{rank}.log"
    for step in range(steps):
        value = torch.ones(1)
        dist.all_reduce(value)
        with log.open("a") as f:
            f.write(f"restart={restart} step={step} world={world} sum={int(value.item())}\n")
        time.sleep(0.2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
