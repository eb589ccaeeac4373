"""A sweep spec the sweep tests share."""

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
