"""Data files of every format become the same problems; templates, system prompts and the chat template
render as configured; the held-out split; prompts too long for the engine are refused before a step."""

from __future__ import annotations

import json

import pytest

from colocate.config import DataConfig
from colocate.data.build import build_problems, check_rows
from colocate.data.problem import DataError
from colocate.models.tiny import default_corpus, train_tokenizer

ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}", "id": i} for i in range(10)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(), vocab_size=512)  # the tiny model's tokenizer, chat template included


def _write(tmp_path, fmt: str) -> str:
    import datasets

    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        return str(path)
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / ("d" if fmt == "folder" else f"d.{fmt}")
    {"json": ds.to_json, "parquet": ds.to_parquet, "csv": ds.to_csv, "folder": ds.save_to_disk}[fmt](str(path))
    return str(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "folder"])
def test_every_format_gives_the_same_problems(tmp_path, tok, fmt):
    d = DataConfig(path=_write(tmp_path, fmt), prompt_key="question", chat="false", val_fraction=0.2)
    assert check_rows(d) == (8, 2)
    train, val = build_problems(d, tok)
    by_index = {p.index: p for p in (*train, *val)}
    assert sorted(by_index) == list(range(10))
    for i, p in by_index.items():
        assert p.prompt == ROWS[i]["question"] and p.answer == ROWS[i]["answer"]
        assert p.row["id"] == i  # the whole row travels, for module:function rewards


def test_template_system_prompt_and_chat_template(tmp_path, tok):
    d = DataConfig(path=_write(tmp_path, "jsonl"), template="{question} Put the answer after ####.",
                   system_prompt="You are careful.", chat="auto")
    train, _ = build_problems(d, tok)
    p = train[0]
    assert p.prompt == (f"system: You are careful.\nuser: {ROWS[p.index]['question']} Put the answer after ####.\n"
                        "assistant:")  # the tiny tokenizer's chat template
    raw, _ = build_problems(DataConfig(path=d.path, template=d.template, system_prompt=d.system_prompt,
                                       chat="false"), tok)
    assert raw[0].prompt == f"You are careful.\n{ROWS[raw[0].index]['question']} Put the answer after ####."


def test_auto_leaves_the_arithmetic_generator_raw_and_true_templates_it(tok):
    raw, _ = build_problems(DataConfig(), tok)
    assert raw[0].prompt.startswith("Q: ") and raw[0].prompt.endswith("= A:")
    chat, _ = build_problems(DataConfig(chat="true"), tok)
    assert chat[0].prompt == f"user: {raw[0].prompt}\nassistant:"


def test_chat_true_without_a_template_is_refused(tmp_path, tok):
    tok_plain = train_tokenizer(default_corpus(), vocab_size=512)
    tok_plain.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        build_problems(DataConfig(path=_write(tmp_path, "jsonl"), prompt_key="question", chat="true"), tok_plain)


def test_val_path_holds_out_a_file(tmp_path, tok):
    train_path = _write(tmp_path, "jsonl")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"question": "held out?", "answer": "#### 1"}) + "\n")
    d = DataConfig(path=train_path, val_path=str(val), prompt_key="question", chat="false")
    assert check_rows(d) == (10, 1)
    train, held = build_problems(d, tok)
    assert len(train) == 10 and [p.prompt for p in held] == ["held out?"]


def test_a_message_list_prompt_goes_through_the_chat_template(tmp_path, tok):
    path = tmp_path / "m.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}], "answer": str(i)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = build_problems(DataConfig(path=str(path), prompt_key="messages"), tok)
    assert {p.prompt for p in (*train, *val)} == {f"user: hi {i}\nassistant:" for i in range(3)}


def test_prompt_too_long_for_the_engine_names_the_row(tok):
    from colocate.algorithms.grpo import GRPO

    train, val = build_problems(DataConfig(), tok)
    grpo = GRPO(policy=None, generation=None, refit=lambda: {}, tokenizer=tok, score=lambda t, p: [], train=train,
                val=val, prompts_per_step=1, samples_per_prompt=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                seed=0)
    grpo.check_prompt_lengths(max_model_len=64)
    with pytest.raises(DataError, match=r"row \d+ has a prompt of \d+ tokens: .* generation.max_model_len=8"):
        grpo.check_prompt_lengths(max_model_len=8)
