"""Shared fixtures: tiny random-weight models built at test time (nothing committed)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_family():
    """A draft and two workers sharing one 8-token vocabulary, with distinct random weights.

    Small V keeps chi-square tests powerful; logit_scale spreads the distributions so that
    q and the p_i differ clearly (acceptance well below 1, residual sampling exercised).
    """
    from specfed.models import make_tiny_model

    draft = make_tiny_model(vocab_size=8, seed=1, logit_scale=1.0)
    w1 = make_tiny_model(vocab_size=8, seed=2, logit_scale=1.0)
    w2 = make_tiny_model(vocab_size=8, seed=3, logit_scale=1.0)
    return draft, w1, w2
