"""Runs train/run.py as its own process (as `python train/run.py FLAGS` would) with a pause in each of the two
moments after a stop's save in which a late signal can arrive: while train() ends (its TensorBoard writer
closed) and after train() has returned, while train/run.py reports the stop. Each pause is announced on stderr
("paused: ..."), so that tests/test_train.py can send its signal there.

    python tests/train_with_pauses.py <train/run.py flags>
"""

import runpy
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from dcama.train import RunStopped

REPO = Path(__file__).resolve().parents[1]
PAUSE_S = 3.0


def paused(what: str, method):
    def wrapper(*args, **kwargs):
        result = method(*args, **kwargs)
        print(f"paused: {what}", file=sys.stderr, flush=True)
        time.sleep(PAUSE_S)
        return result

    return wrapper


if __name__ == "__main__":
    SummaryWriter.close = paused("train() is ending", SummaryWriter.close)
    RunStopped.__str__ = paused("train/run.py reports the stop", RunStopped.__str__)  # print(stop) in main()
    sys.argv = [str(REPO / "train" / "run.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
