"""Prompts of the user's own for the constraint steps (``L3MTrainer(constraint_dataset=...)``, ``l3m train``'s
``constraint_dataset_name``): constraint steps sample responses to those prompts only, objective steps read the task
data exactly as without them."""

from __future__ import annotations

from functools import partial

import pytest
from datasets import Dataset

from fixtures.tiny import build_tokenizer, make_examples
from fixtures.trainers import make_trainer
from l3m import Constraint, L3MConfigError
from l3m.data import prepare_prompts
from l3m.errors import L3MDataError
from l3m.training.batch_order import CoinSampler
from l3m.training.coin import is_constraint_step

# prompts the task data never has: its questions start with "please say"
DEPLOYED = [{"prompt": [{"role": "user", "content": f"tell me {word}"}]} for word in ("yes", "no", "maybe")]


def test_constraint_steps_read_only_the_prompts_after_the_task_examples():
    coin = partial(is_constraint_step, 1)
    with_prompts = CoinSampler(20, 4, 1, coin, constraint_examples=6)
    alone = CoinSampler(20, 4, 1, coin)
    assert len(with_prompts) == len(alone) == 20  # an epoch is a pass over the task data
    steps = [list(with_prompts)[i:i + 4] for i in range(0, 20, 4)]
    plain = [list(alone)[i:i + 4] for i in range(0, 20, 4)]
    for step, (batch, before) in enumerate(zip(steps, plain)):
        if coin(step):
            assert all(20 <= index < 26 for index in batch)
        else:
            assert batch == before  # objective steps: the very batches a run without the prompts reads
    assert any(coin(step) for step in range(5)) and not all(coin(step) for step in range(5))
    # a resumed run (epoch 1 on its own) reads what the run that went on into it read
    two_epochs = []
    for epoch in (0, 1):
        with_prompts.set_epoch(epoch)
        two_epochs += list(with_prompts)
    resumed = CoinSampler(20, 4, 1, coin, constraint_examples=6)
    resumed.set_epoch(1)
    assert list(resumed) == two_epochs[20:]


def test_the_trainer_samples_the_constraint_dataset_and_trains_on_the_task_data(tmp_path):
    run = partial(make_trainer, num_examples=16, max_steps=6, per_device_train_batch_size=4, max_completion_length=4,
                  constraints=[Constraint("length_tokens", max=3)])
    trainer = run(tmp_path / "own", constraint_examples=DEPLOYED)
    plain = run(tmp_path / "plain")
    seen = {}
    for name, t in (("own", trainer), ("plain", plain)):
        steps = seen[name] = []
        for kind in ("_constraint_loss", "_objective_loss"):
            original = getattr(t, kind)

            def record(model, inputs, original=original, kind=kind, steps=steps):
                if model.training:
                    steps.append((kind, list(inputs["prompts"])))
                return original(model, inputs)

            setattr(t, kind, record)
        t.train()
    constraint_prompts = [p for kind, prompts in seen["own"] if kind == "_constraint_loss" for p in prompts]
    assert constraint_prompts and all("tell me" in p for p in constraint_prompts)
    objective = [prompts for kind, prompts in seen["own"] if kind == "_objective_loss"]
    assert objective == [prompts for kind, prompts in seen["plain"] if kind == "_objective_loss"]
    assert all("please say" in p for prompts in objective for p in prompts)


@pytest.mark.parametrize("example, expected", [
    ({"prompt": "Q: hello\nA:"}, "Q: hello\nA:"),  # text as it is
    ({"prompt": [{"role": "user", "content": "hello"}]},
     "<|im_start|> user: hello <|im_end|> <|im_start|> assistant: "),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                   {"role": "user", "content": "hello"}]},  # ends with a user turn: all of it
     "<|im_start|> user: hi <|im_end|> <|im_start|> assistant: yo <|im_end|> <|im_start|> user: hello <|im_end|> "
     "<|im_start|> assistant: "),
])
def test_prompt_formats(example, expected):
    tokenizer = build_tokenizer()  # its chat template: "<|im_start|> role: content <|im_end|> " per message
    row = prepare_prompts(Dataset.from_list([example]), tokenizer, max_length=64)[0]
    assert row["prompt"] == expected and row["completion_ids"] == [] and row["reference"] == ""
    assert row["prompt_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_task_data_as_prompts_keeps_the_dialogue_before_an_answer():
    tokenizer = build_tokenizer()
    examples = make_examples(4, 8, 12, seed=0)
    prepared = prepare_prompts(Dataset.from_list(examples), tokenizer, max_length=64)
    for example, row in zip(examples, prepared):
        question, answer = (m["content"] for m in example["messages"])
        assert question in row["prompt"] and answer not in row["prompt"]


@pytest.mark.parametrize("data, message", [
    ([{"text": "hello"}], "constraint_dataset: the train split has columns ['text']; expected 'prompt' or 'messages'"),
    ([{"prompt": 3}], "constraint_dataset: expected a prompt as text or a list of messages, got 3"),
    ([{"prompt": "a " * 80}], "max_length: all 1 constraint_dataset prompts exceed 64 tokens; raise it"),
])
def test_bad_prompts_are_named(data, message):
    with pytest.raises(L3MDataError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        prepare_prompts(Dataset.from_list(data), build_tokenizer(), max_length=64)


def test_a_constraint_dataset_without_constraints_is_an_error(tmp_path):
    with pytest.raises(L3MConfigError, match="constraint_dataset: given, but there are no constraints"):
        make_trainer(tmp_path, constraint_examples=DEPLOYED)
