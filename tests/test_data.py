"""Task data: rendering, tokenizing, filtering to max_length, collating, and splitting local files."""

from __future__ import annotations

import json
import logging
import random

import datasets
import pytest
import torch
from datasets import Dataset
from fixtures.tiny import build_tokenizer, make_examples

from l3m.data import (
    CompletionCollator,
    left_pad,
    load_task_splits,
    prepare_dataset,
    render_example,
    split_conversation,
    tokenize_example,
)
from l3m.errors import L3MDataError

MULTI_TURN = {
    "messages": [
        {"role": "user", "content": "please say w1"},
        {"role": "assistant", "content": "w2 w3"},
        {"role": "user", "content": "count w4"},
        {"role": "assistant", "content": "w5"},
    ]
}
# the tiny chat template renders each message as "<|im_start|> {role}: {content} <|im_end|> "
FIRST_TURN_PROMPT = "<|im_start|> user: please say w1 <|im_end|> <|im_start|> assistant: "
SECOND_TURN_PROMPT = (
    "<|im_start|> user: please say w1 <|im_end|> <|im_start|> assistant: w2 w3 <|im_end|> "
    "<|im_start|> user: count w4 <|im_end|> <|im_start|> assistant: "
)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tok_plain():
    return build_tokenizer(chat_template=False)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PickLast:
    """A stand-in for random.Random that always picks the last candidate."""

    def choice(self, seq):
        return seq[-1]


class PickFirst:
    def choice(self, seq):
        return seq[0]


# ----------------------------------------------------------------------------------------------------------------
# the messages format
# ----------------------------------------------------------------------------------------------------------------


def test_split_conversation_takes_everything_before_the_chosen_assistant_turn():
    prompt, response = split_conversation(MULTI_TURN, PickLast())
    assert prompt == MULTI_TURN["messages"][:3]
    assert response == {"role": "assistant", "content": "w5"}
    prompt, response = split_conversation(MULTI_TURN, PickFirst())
    assert prompt == MULTI_TURN["messages"][:1]
    assert response == {"role": "assistant", "content": "w2 w3"}


def test_split_conversation_only_picks_assistant_turns():
    seen = {split_conversation(MULTI_TURN, random.Random(s))[1]["content"] for s in range(50)}
    assert seen == {"w2 w3", "w5"}


def test_render_multi_turn_with_the_chat_template(tok):
    prompt, completion, reference = render_example(MULTI_TURN, tok, PickLast())
    assert prompt == SECOND_TURN_PROMPT
    assert completion.startswith("w5 <|im_end|>")
    assert reference == "w5"
    prompt, completion, reference = render_example(MULTI_TURN, tok, PickFirst())
    assert prompt == FIRST_TURN_PROMPT
    assert reference == "w2 w3"


def test_prepare_multi_turn_dataset(tok):
    ds = Dataset.from_list([MULTI_TURN] * 24)
    out = prepare_dataset(ds, tok, max_length=512, seed=0)
    assert len(out) == 24
    assert set(out.column_names) == {"prompt", "reference", "prompt_ids", "completion_ids"}
    expected_prompt = {"w2 w3": FIRST_TURN_PROMPT, "w5": SECOND_TURN_PROMPT}
    for row in out:
        assert row["reference"] in expected_prompt
        assert row["prompt"] == expected_prompt[row["reference"]]
        assert row["prompt_ids"] == ids(tok, row["prompt"])
        assert row["completion_ids"] == ids(tok, row["reference"]) + [tok.eos_token_id]
    # both assistant turns get picked across the examples
    assert set(out["reference"]) == {"w2 w3", "w5"}


def test_prepare_is_deterministic_for_a_seed(tok):
    ds = Dataset.from_list([MULTI_TURN] * 24)
    a = prepare_dataset(ds, tok, max_length=512, seed=3)
    b = prepare_dataset(ds, tok, max_length=512, seed=3)
    c = prepare_dataset(ds, tok, max_length=512, seed=4)
    assert a.to_list() == b.to_list()
    assert a["reference"] != c["reference"]  # another seed picks other turns


def test_conversation_without_an_assistant_turn_errors(tok):
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": "please say w1"}]}])
    with pytest.raises(L3MDataError, match=r"^messages: a conversation has no assistant turn"):
        prepare_dataset(ds, tok, max_length=512)


def test_conversation_starting_with_the_assistant_errors(tok):
    ds = Dataset.from_list([{"messages": [{"role": "assistant", "content": "w1"}, {"role": "user", "content": "w2"}]}])
    with pytest.raises(L3MDataError, match=r"^messages: a conversation starts with an assistant turn"):
        prepare_dataset(ds, tok, max_length=512)


# ----------------------------------------------------------------------------------------------------------------
# the prompt/completion format
# ----------------------------------------------------------------------------------------------------------------


def test_prompt_completion_strings_are_used_as_they_are(tok):
    ds = Dataset.from_list([{"prompt": "please say w1", "completion": "w2 w3"}])
    (row,) = prepare_dataset(ds, tok, max_length=512).to_list()
    assert row["prompt"] == "please say w1"
    assert row["reference"] == "w2 w3"
    assert row["prompt_ids"] == ids(tok, "please say w1")
    assert row["completion_ids"] == ids(tok, "w2 w3") + [tok.eos_token_id]


def test_prompt_completion_as_messages_use_the_chat_template(tok):
    ex = {"prompt": [{"role": "user", "content": "please say w1"}],
          "completion": [{"role": "assistant", "content": "w2 w3"}]}
    prompt, completion, reference = render_example(ex, tok, random.Random(0))
    assert prompt == FIRST_TURN_PROMPT
    assert reference == "w2 w3"
    _, completion_ids = tokenize_example(prompt, completion, tok)
    assert completion_ids == ids(tok, "w2 w3") + [tok.eos_token_id]


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_completion_ids_end_with_a_single_eos(tok, fmt):
    ds = Dataset.from_list(make_examples(12, 1, 6, seed=1, fmt=fmt))
    out = prepare_dataset(ds, tok, max_length=512)
    assert len(out) == 12
    for row in out:
        assert row["completion_ids"][-1] == tok.eos_token_id
        assert row["completion_ids"].count(tok.eos_token_id) == 1
        assert len(row["completion_ids"]) == len(row["reference"].split()) + 1  # one token per word, plus EOS


def test_tokenize_example_cuts_after_the_first_eos(tok):
    prompt_ids, completion_ids = tokenize_example("please", "w1 w2 <|im_end|> w3 <|im_end|>", tok)
    assert prompt_ids == ids(tok, "please")
    assert completion_ids == ids(tok, "w1 w2") + [tok.eos_token_id]


# ----------------------------------------------------------------------------------------------------------------
# filtering and bad inputs
# ----------------------------------------------------------------------------------------------------------------


def test_examples_over_max_length_are_dropped(tok, caplog):
    ds = Dataset.from_list(make_examples(30, 1, 12, seed=2, fmt="prompt_completion"))
    full = prepare_dataset(ds, tok, max_length=10_000)
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in full]
    max_length = sorted(lengths)[len(lengths) // 2]
    expected_kept = sum(n <= max_length for n in lengths)
    assert 0 < expected_kept < len(lengths)
    with caplog.at_level(logging.WARNING, logger="l3m.data"):
        kept = prepare_dataset(ds, tok, max_length=max_length)
    assert len(kept) == expected_kept
    assert all(len(r["prompt_ids"]) + len(r["completion_ids"]) <= max_length for r in kept)
    # the kept ones are exactly the short ones, in order
    assert kept["prompt"] == [r["prompt"] for r, n in zip(full, lengths) if n <= max_length]
    assert f"dropped {len(lengths) - expected_kept} of {len(lengths)}" in caplog.text


def test_all_examples_too_long_raises_naming_max_length(tok):
    ds = Dataset.from_list(make_examples(5, 3, 6, seed=0))
    with pytest.raises(L3MDataError, match=r"^max_length: all 5 train examples exceed 4 tokens"):
        prepare_dataset(ds, tok, max_length=4)


@pytest.mark.parametrize("rows", [[{"text": "w1"}], [{"prompt": "w1"}], [{"completion": "w1", "answer": "w2"}]])
def test_missing_columns_error(tok, rows):
    with pytest.raises(L3MDataError, match=r"^dataset: the validation split has columns .*expected 'messages' or"):
        prepare_dataset(Dataset.from_list(rows), tok, max_length=512, name="validation")


def test_empty_split_errors(tok):
    empty = Dataset.from_dict({"prompt": [], "completion": []})
    with pytest.raises(L3MDataError, match=r"^dataset: the test split is empty"):
        prepare_dataset(empty, tok, max_length=512, name="test")


# ----------------------------------------------------------------------------------------------------------------
# a tokenizer without a chat template
# ----------------------------------------------------------------------------------------------------------------


def test_tokenizer_without_a_chat_template(tok_plain):
    assert not tok_plain.chat_template
    prompt, completion, reference = render_example(MULTI_TURN, tok_plain, PickLast())
    assert prompt == "user: please say w1\nassistant: w2 w3\nuser: count w4\nassistant: "
    assert completion == reference == "w5"
    ds = Dataset.from_list(make_examples(8, 1, 4, seed=5))
    out = prepare_dataset(ds, tok_plain, max_length=512)
    assert len(out) == 8
    for row, ex in zip(out, make_examples(8, 1, 4, seed=5)):
        question, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
        assert row["prompt"] == f"user: {question}\nassistant: "
        assert row["prompt_ids"] == tok_plain(row["prompt"])["input_ids"]
        assert row["completion_ids"] == ids(tok_plain, answer) + [tok_plain.eos_token_id]
    batch = CompletionCollator(tok_plain.pad_token_id)(out.to_list()[:3])
    assert batch["input_ids"].shape[0] == 3


# ----------------------------------------------------------------------------------------------------------------
# collating
# ----------------------------------------------------------------------------------------------------------------


def test_collator_labels_padding_and_left_padded_prompts():
    pad = 0
    examples = [
        {"prompt": "p1", "prompt_ids": [11, 12, 13], "completion_ids": [21, 2]},
        {"prompt": "p2", "prompt_ids": [14], "completion_ids": [22, 23, 24, 2]},
        {"prompt": "p3", "prompt_ids": [15, 16], "completion_ids": [2]},
    ]
    batch = CompletionCollator(pad_token_id=pad)(examples)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([
        [11, 12, 13, 21, 2],
        [14, 22, 23, 24, 2],
        [15, 16, 2, pad, pad],
    ]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
    ]))
    # -100 on prompt and padding, the completion ids elsewhere
    torch.testing.assert_close(batch["labels"], torch.tensor([
        [-100, -100, -100, 21, 2],
        [-100, 22, 23, 24, 2],
        [-100, -100, 2, -100, -100],
    ]))
    torch.testing.assert_close(batch["prompt_input_ids"], torch.tensor([
        [11, 12, 13],
        [pad, pad, 14],
        [pad, 15, 16],
    ]))
    torch.testing.assert_close(batch["prompt_attention_mask"], torch.tensor([
        [1, 1, 1],
        [0, 0, 1],
        [0, 1, 1],
    ]))
    assert batch["prompts"] == ["p1", "p2", "p3"]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_collator_on_prepared_data(tok):
    out = prepare_dataset(Dataset.from_list(make_examples(6, 1, 8, seed=7)), tok, max_length=512).to_list()
    batch = CompletionCollator(tok.pad_token_id)(out)
    for i, ex in enumerate(out):
        p, c = len(ex["prompt_ids"]), len(ex["completion_ids"])
        labels = batch["labels"][i]
        assert (labels[:p] == -100).all()
        assert labels[p:p + c].tolist() == ex["completion_ids"]
        assert (labels[p + c:] == -100).all()
        assert (batch["input_ids"][i, p + c:] == tok.pad_token_id).all()
        width = batch["prompt_input_ids"].shape[1]
        assert batch["prompt_input_ids"][i, width - p:].tolist() == ex["prompt_ids"]
        assert batch["prompt_attention_mask"][i].tolist() == [0] * (width - p) + [1] * p
    assert batch["prompts"] == [ex["prompt"] for ex in out]


def test_left_pad_with_an_empty_sequence():
    padded, mask = left_pad([[5, 6], []], pad_id=9)
    assert padded.tolist() == [[5, 6], [9, 9]]
    assert mask.tolist() == [[1, 1], [0, 0]]


# ----------------------------------------------------------------------------------------------------------------
# load_task_splits on a local file
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def jsonl_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # keep the user's cache clean
    path = tmp_path / "task.jsonl"
    rows = make_examples(40, 1, 5, seed=11)
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"id": i, **row}) + "\n")
    return str(path)


def test_load_task_splits_sizes_and_disjointness(jsonl_file):
    splits = load_task_splits(jsonl_file, validation_size=5, test_size=0.1, seed=0)
    assert set(splits) == {"train", "validation", "test"}
    # test: round(0.1 * 40) = 4 carved first; validation: 5 of the remaining 36; train: the other 31
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (31, 5, 4)
    train, val, test = (set(splits[k]["id"]) for k in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(40))
    assert "messages" in splits["train"].column_names


def test_load_task_splits_is_deterministic_for_a_seed(jsonl_file):
    a = load_task_splits(jsonl_file, validation_size=0.1, test_size=0.1, seed=1)
    b = load_task_splits(jsonl_file, validation_size=0.1, test_size=0.1, seed=1)
    c = load_task_splits(jsonl_file, validation_size=0.1, test_size=0.1, seed=2)
    for key in ("train", "validation", "test"):
        assert a[key]["id"] == b[key]["id"]
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (32, 4, 4)  # 4 = round(0.1*40) and round(0.1*36)
    assert set(a["test"]["id"]) != set(c["test"]["id"]) or set(a["validation"]["id"]) != set(c["validation"]["id"])


def test_load_task_splits_feeds_prepare_dataset(jsonl_file, tok):
    splits = load_task_splits(jsonl_file, validation_size=4, test_size=4, seed=0)
    prepared = prepare_dataset(splits["validation"], tok, max_length=512, name="validation")
    assert len(prepared) == 4


def test_load_task_splits_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tiny = tmp_path / "two.jsonl"
    tiny.write_text("".join(json.dumps(r) + "\n" for r in make_examples(2, 1, 2)), encoding="utf-8")
    # 2 examples: the test split takes 1, then nothing would be left to train on after a validation split
    with pytest.raises(L3MDataError, match=r"^validation_size: cannot hold out 0.05 of the 1 remaining training "):
        load_task_splits(str(tiny))
    with pytest.raises(L3MDataError, match=r"^test_size: cannot hold out 5 of the 2 remaining training "):
        load_task_splits(str(tiny), test_size=5)
    with pytest.raises(L3MDataError, match=r"^dataset_train_split: .* has no split 'training'"):
        load_task_splits(str(tiny), splits=("training", "validation", "test"))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("not data", encoding="utf-8")
    with pytest.raises(L3MDataError, match=r"^dataset_name: folder .* holds no \.json/\.jsonl/\.parquet files"):
        load_task_splits(str(empty_dir))
