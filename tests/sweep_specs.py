"""What the sweep tests share: a slow spec and the in-process oracle."""

import torch

from gatelens.experiments import long_range

# Points long enough (about 0.5–1 s each on one thread) that a worker, or the sweep itself, can be killed while
# some are running and others are still to run.
SLOW = """\
experiment = "long-range"

[settings]
sequences = 200
hidden = 8
epochs = 20
patience = 20

[grid]
architecture = ["gru", "lstm"]
length = [20, 30]
seed = [0, 1]
"""


def in_process(config: dict) -> dict:
    """The oracle: the experiment's per-point function called here, on one thread as the runner runs it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return long_range.point(config)
    finally:
        torch.set_num_threads(threads)
