"""Runs train/run.py as its own process (as `python train/run.py FLAGS` would) with a pause at each of the
chosen moments in which a signal can arrive, so that tests/test_train.py can send its signals there. Each pause
is announced on stderr ("paused: <name>") as it begins; PAUSES is a comma-separated list of the names below.

    python tests/train_with_pauses.py PAUSES <train/run.py flags>
"""

import runpy
import sys
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

import dcama.train as engine
from dcama.train import RunStopped

REPO = Path(__file__).resolve().parents[1]
PAUSE_S = 3.0


def pause_after(what: str, method):
    def wrapper(*args, **kwargs):
        result = method(*args, **kwargs)
        print(f"paused: {what}", file=sys.stderr, flush=True)
        time.sleep(PAUSE_S)
        return result

    return wrapper


def pause_before(what: str, method):
    def wrapper(*args, **kwargs):
        print(f"paused: {what}", file=sys.stderr, flush=True)
        time.sleep(PAUSE_S)
        return method(*args, **kwargs)

    return wrapper


# name: (the object, its attribute, how the pause wraps it)
PAUSES = {
    # Validation has run, its scores are not returned yet: a signal here is one during validation.
    "validation": (engine, "_validate", pause_after),
    # The end of an epoch: its checkpoints are written, metrics.jsonl is about to be.
    "metrics.jsonl": (engine, "write_jsonl", pause_before),
    # After a stop's save: train() ends (its TensorBoard writer closed)...
    "train() is ending": (SummaryWriter, "close", pause_after),
    # ...and train() has returned, train/run.py reports the stop (print(stop) in main()).
    "train/run.py reports the stop": (RunStopped, "__str__", pause_after),
}

if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        owner, attribute, pause = PAUSES[name]
        setattr(owner, attribute, pause(name, getattr(owner, attribute)))
    sys.argv = [str(REPO / "train" / "run.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
