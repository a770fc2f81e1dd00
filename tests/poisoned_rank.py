"""Fault injection for the tests: `train_transformer.py` under torchrun with the LM loss of rank
POISON_RANK made NaN at its POISON_PASS-th training pass, as a batch that diverges on one GPU
would make it; everything else is the script as it is.

    python -m torch.distributed.run --nproc_per_node 2 tests/poisoned_rank.py ARGS...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train_transformer  # noqa: E402
from model.training import run_script  # noqa: E402

rank, at = int(os.environ.get("POISON_RANK", "1")), int(os.environ.get("POISON_PASS", "1"))
passes = [0]
compute_losses = train_transformer.compute_losses


def poisoned(*args, **kwargs):
    losses, stats = compute_losses(*args, **kwargs)
    if torch.is_grad_enabled() and int(os.environ.get("RANK", "0")) == rank:  # a training pass, not validation
        passes[0] += 1
        if passes[0] == at:
            losses = {k: v * float("nan") if k == "lm_ce" else v for k, v in losses.items()}
    return losses, stats


train_transformer.compute_losses = poisoned
sys.argv[0] = train_transformer.__file__
run_script(train_transformer.main)
