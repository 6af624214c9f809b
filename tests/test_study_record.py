"""Step 1 of the study (specfed.study.record): exact bf16 storage, the cache key and files,
and the prompt-count check. The models themselves run in tests/test_study_run.py.

Notation: l_i worker logits, l_q draft logits, [n, V] per prompt.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specfed.config import ConfigError
from specfed.study.config import load_study
from specfed.study.record import (
    PromptLogits,
    cache_file,
    cache_key,
    load_record,
    logits_to_numpy,
    prompt_seed,
    record_logits,
    save_record,
)
from tests.study_helpers import STUDY, logits, synthetic_records, tiny_study


def test_bf16_logits_round_trip_exactly():
    x = logits(4, 64, seed=1, scale=5.0).to(torch.bfloat16)
    stored = logits_to_numpy(x)
    assert stored.dtype == np.uint16
    rec = PromptLogits("p", np.arange(3), np.arange(4), {"m": stored})
    assert torch.equal(rec.tensor("m"), x)
    f32 = logits(2, 8, seed=2, scale=1.0)
    assert torch.equal(
        PromptLogits("p", np.arange(1), np.arange(2), {"m": logits_to_numpy(f32)}).tensor("m"), f32
    )


def test_record_file_round_trip(tmp_path):
    rec = synthetic_records(n_prompts=1)[0]
    rec.text = "x = 1"
    path = tmp_path / "sub" / "r.npz"
    save_record(path, rec, ["d", "a", "b"])
    back = load_record(path)
    assert (back.prompt_id, back.text, back.n_positions) == ("p0", "x = 1", 7)
    for m in ("d", "a", "b"):
        assert torch.equal(back.tensor(m), rec.tensor(m))
    assert not list(tmp_path.rglob("*.tmp.npz"))


def test_cache_key_follows_what_the_logits_depend_on():
    cfg = load_study(STUDY)
    key = cache_key(cfg, "HumanEval/0", "def f():")
    assert key == cache_key(cfg, "HumanEval/0", "def f():") and len(key) == 20
    # the grid never re-runs the models
    for change in ({"temperatures": (1.0,)}, {"k_fractions": (0.5,)}, {"softmax": "fp32"}):
        assert cache_key(cfg.replace(**change), "HumanEval/0", "def f():") == key
    # everything the generation and the logits depend on does
    for change in (
        {"draft": "other"},
        {"dtype": "fp32"},
        {"positions": 8},
        {"seed": 1},
        {"gamma": 2},
        {"generation_temperature": 0.7},
        {"weights": {"w1": 0.25, "w2": 0.75}},
    ):
        assert cache_key(cfg.replace(**change), "HumanEval/0", "def f():") != key, change
    assert cache_key(cfg, "HumanEval/0", "def g():") != key
    # greedy ignores the generation temperature
    greedy = cfg.replace(generation_mode="greedy")
    assert cache_key(greedy.replace(generation_temperature=0.5), "p", "t") == cache_key(
        greedy, "p", "t"
    )
    f = cache_file(STUDY.parent, cfg, "HumanEval/0", "def f():")
    assert f.parent == STUDY.parent and f.name == f"HumanEval_0-{key}.npz"


def test_prompt_seed_is_stable_and_per_prompt():
    assert prompt_seed(1234, "HumanEval/0") == prompt_seed(1234, "HumanEval/0")
    assert prompt_seed(1234, "HumanEval/0") != prompt_seed(1234, "HumanEval/1")
    assert 0 <= prompt_seed(-5, "x") < 2**31


def test_more_prompts_asked_than_the_source_holds(tmp_path):
    cfg = load_study(tiny_study(tmp_path)).replace(n_prompts=3)
    with pytest.raises(ConfigError, match=r"prompts\.count: 3 prompts asked, but"):
        record_logits(cfg, None, log=lambda _: None)
