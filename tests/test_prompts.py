from __future__ import annotations

import json

import pytest

from specfed.prompts import PromptError, load_prompts


def test_humaneval_slices():
    ps = load_prompts("humaneval[:4]")
    assert [p.id for p in ps] == [f"HumanEval/{i}" for i in range(4)]
    assert ps[0].text and "def " in ps[0].text
    assert len(load_prompts("humaneval")) == 164
    assert [p.id for p in load_prompts("humaneval[10:12]")] == ["HumanEval/10", "HumanEval/11"]
    with pytest.raises(PromptError, match="selects no"):
        load_prompts("humaneval[200:]")


def test_jsonl_ids_literal(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n\n" + json.dumps({"prompt": "y"}))
    assert [(p.id, p.text) for p in load_prompts(str(f))] == [("a", "x"), ("p/3", "y")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    with pytest.raises(PromptError, match=r"bad.jsonl:1: .*'prompt'"):
        load_prompts(str(bad))
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    assert load_prompts("ids:3, 4,5")[0].token_ids == (3, 4, 5)
    with pytest.raises(PromptError, match="integers"):
        load_prompts("ids:a")
    assert load_prompts("def f():")[0].text == "def f():"
