"""The first half of the kill-and-resume tests (tests/test_train.py): trains as train/run.py would and kills this
process with SIGKILL after a given step, as a preempted job dies (the step's checkpoint, if one was due, is
not written). Under torchrun every rank kills itself after the same step.

    python tests/train_and_kill.py EPOCH STEP [--reference DIR] <train/run.py flags>

With --reference DIR the same run is first trained, uninterrupted, into DIR: one launch for both, because
starting the processes is what these tests spend most of their time on.
"""

import dataclasses
import importlib.util
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from dcama.train import train

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train" / "run.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    kill_at, flags = (int(argv[0]), int(argv[1])), argv[2:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # one group for both runs (train() joins an existing one)
    cfg = cli.parse_args(flags[2:] if flags[:1] == ["--reference"] else flags)
    if flags[:1] == ["--reference"]:  # saving only at epoch ends: the checkpoints must not change the run
        train(dataclasses.replace(cfg, logdir=flags[1], save_every_min=0.0))

    def kill(epoch: int, step: int) -> None:
        if (epoch, step) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, on_step_end=kill)
    print(f"the run ended before epoch {kill_at[0]}, step {kill_at[1]}", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
