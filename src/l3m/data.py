"""Task data: loading, splitting, rendering with the chat template, tokenizing, and collating.

Two input formats (TRL's): ``messages`` conversations, where one random assistant turn is the response and the
dialogue before it is the prompt (App. A, UltraChat style), and ``prompt``/``completion`` pairs (strings, or
lists of messages). Each example becomes ``prompt_ids`` and ``completion_ids``; the completion ends with the
end-of-turn (EOS) token so that the model learns to stop.

Shapes: B examples, P prompt tokens (left padded), T prompt + completion tokens (right padded).
"""

from __future__ import annotations

import codecs
import logging
import os
import random
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset

from l3m.errors import L3MDataError

logger = logging.getLogger(__name__)

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_task_splits(
    dataset_name: str,
    dataset_config: str | None = None,
    splits: tuple[str, str, str] = ("train", "validation", "test"),
    validation_size: float = 0.05,
    test_size: float = 0.05,
    seed: int = 42,
    data_dir: str | None = None,
) -> DatasetDict:
    """Load task data from the hub or local JSON/JSONL/Parquet files into ``train``/``validation``/``test``.

    A local folder whose files are named ``train``/``validation``/``test`` (e.g. ``train.jsonl``, ``test.jsonl``)
    keeps those splits; the files of any other folder are all training data.

    Splits the source lacks are carved out of its train split with ``seed``, so they are the same on every run.
    ``data_dir`` selects a hub dataset's subfolder (e.g. ``harmless-base`` of ``Anthropic/hh-rlhf``).
    """
    raw = _load_raw(dataset_name, dataset_config, data_dir)
    train_name, validation_name, test_name = splits
    if train_name not in raw:
        raise L3MDataError(f"dataset_train_split: {dataset_name!r} has no split {train_name!r} (it has {list(raw)})")
    train = raw[train_name]
    out = {}
    for key, name, size in (("test", test_name, test_size), ("validation", validation_name, validation_size)):
        if name in raw:
            out[key] = raw[name]
            continue
        count = int(size) if size >= 1 else max(1, round(size * len(train)))
        if size <= 0 or count >= len(train):
            raise L3MDataError(
                f"{key}_size: cannot hold out {size:g} of the {len(train)} remaining training examples of "
                f"{dataset_name!r} for {key}; use a fraction in (0, 1) or a smaller count"
            )
        parts = train.train_test_split(test_size=count, seed=seed, shuffle=True)
        train, out[key] = parts["train"], parts["test"]
    out["train"] = train
    for key, split in out.items():
        if len(split) == 0:
            raise L3MDataError(f"dataset_name: the {key} split of {dataset_name!r} is empty")
    return DatasetDict(out)


def load_prompt_split(dataset_name: str, dataset_config: str | None, split: str,
                      field: str = "constraint_dataset_name") -> Dataset:
    """Split ``split`` of a hub dataset or local JSON/JSONL/Parquet file or folder, as it is (prompts for
    :func:`prepare_prompts`); errors name ``field``."""
    raw = _load_raw(dataset_name, dataset_config, field=field)
    if split not in raw:
        raise L3MDataError(f"{field}: {dataset_name!r} has no split {split!r} (it has {list(raw)}); set "
                           f"{field.removesuffix('_name')}_split")
    check_prompt_columns(raw[split], split, field)
    return raw[split]


def _load_raw(dataset_name: str, dataset_config: str | None, data_dir: str | None = None,
              field: str = "dataset_name") -> DatasetDict:
    if os.path.exists(dataset_name):
        if os.path.isdir(dataset_name):
            files = sorted(os.path.join(dataset_name, f) for f in os.listdir(dataset_name))
            files = [f for f in files if os.path.splitext(f)[1] in _LOCAL_BUILDERS]
            if not files:
                raise L3MDataError(f"{field}: folder {dataset_name!r} holds no .json/.jsonl/.parquet files")
        else:
            files = [dataset_name]
        if all(os.path.getsize(f) == 0 for f in files):
            raise L3MDataError(f"{field}: {dataset_name!r} is empty (no examples)")
        extensions = {os.path.splitext(f)[1] for f in files}
        builders = {_LOCAL_BUILDERS.get(ext) for ext in extensions}
        if None in builders or len(builders) != 1:
            raise L3MDataError(f"{field}: expected .json, .jsonl or .parquet files, got {sorted(extensions)}")
        if builders == {"json"}:
            for f in files:
                _check_utf8(f, field)
        # a folder of train/validation/test files keeps those splits; any other files are all training data
        stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
        by_split = ({stem: [f] for stem, f in zip(stems, files)} if "train" in stems and len(set(stems)) == len(stems)
                    and set(stems) <= {"train", "validation", "test"} else {"train": files})
        try:
            return load_dataset(builders.pop(), data_files=by_split)
        except Exception as err:  # datasets raises many types for malformed files
            raise L3MDataError(f"{field}: cannot read {dataset_name!r}: {err or type(err).__name__}") from err
    try:
        return load_dataset(dataset_name, dataset_config, data_dir=data_dir)
    except Exception as err:  # no such local path, and the hub has no such dataset or cannot be reached
        raise L3MDataError(f"{field}: {dataset_name!r} is neither a local file or folder nor a loadable hub "
                           f"dataset ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err


def _check_utf8(path: str, field: str) -> None:
    """Fail, naming the file and the byte offset, unless ``path`` is UTF-8 text (JSON must be)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise L3MDataError(f"{field}: {path} is not UTF-8 text (byte {chunk[err.start]:#04x} at offset "
                                   f"{offset + err.start}); re-save it as UTF-8") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise L3MDataError(f"{field}: {path} is not UTF-8 text (it ends inside a character); re-save it as "
                               "UTF-8") from None


def split_conversation(example: dict[str, Any], rng: random.Random) -> tuple[list[dict], dict]:
    """Pick one assistant turn at random: the dialogue before it is the prompt, the turn is the response."""
    messages = example["messages"]
    check_messages(messages, "messages")
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not turns:
        raise L3MDataError("messages: a conversation has no assistant turn; every example needs at least one")
    t = rng.choice(turns)
    if t == 0:
        raise L3MDataError("messages: a conversation starts with an assistant turn; it needs a user turn first")
    return messages[:t], messages[t]


def check_messages(messages: Any, field: str) -> None:
    """Fail, naming ``field``, unless ``messages`` is a list of ``{role, content}`` mappings with string values."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise L3MDataError(f"{field}: expected a list of {{role, content}} messages, got {str(messages)[:60]!r}")
    for m in messages:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise L3MDataError(f"{field}: every message needs a string 'role' and 'content', got {str(m)[:60]!r}")


def render_example(example: dict[str, Any], tokenizer, rng: random.Random) -> tuple[str, str, str]:
    """Render one example as ``(prompt_text, completion_text, response_only_text)`` with the chat template."""
    if "messages" in example and example["messages"] is not None:
        prompt_messages, response = split_conversation(example, rng)
    elif "prompt" in example and "completion" in example:
        prompt, completion = example["prompt"], example["completion"]
        for field, value in (("prompt", prompt), ("completion", completion)):
            if isinstance(value, list):
                check_messages(value, field)
            elif not isinstance(value, str):
                raise L3MDataError(f"{field}: expected a string or a list of messages, got {value!r}")
        if isinstance(prompt, str) and isinstance(completion, str):
            return prompt, completion, completion
        prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if isinstance(completion, list) and not completion:
            raise L3MDataError("completion: an empty list of messages; it needs the assistant's response")
        response = completion[0] if isinstance(completion, list) else {"role": "assistant", "content": completion}
    else:
        raise L3MDataError(
            f"dataset: an example has columns {sorted(example)}; expected 'messages' or 'prompt' and 'completion'"
        )
    if tokenizer.chat_template:
        prompt_text = render_prompt(prompt_messages, tokenizer)
        full_text = tokenizer.apply_chat_template(prompt_messages + [response], tokenize=False)
        if full_text.startswith(prompt_text):
            return prompt_text, full_text[len(prompt_text):], response["content"]
    return _plain_prompt(prompt_messages), response["content"], response["content"]


def render_prompt(prompt_messages: list[dict], tokenizer) -> str:
    """The text a response to ``prompt_messages`` is sampled after: the chat template with its generation prompt,
    or plain ``role: content`` lines ending in ``assistant: `` for a tokenizer without a template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    return _plain_prompt(prompt_messages)


def _plain_prompt(prompt_messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in prompt_messages) + "assistant: "


def tokenize_example(prompt_text: str, completion_text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the completion; the completion ends at (and includes) its first EOS."""
    prompt_ids = tokenize_prompt(prompt_text, tokenizer)
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in completion_ids:
        completion_ids = completion_ids[: completion_ids.index(eos) + 1]  # drop the template's trailing newline
    else:
        completion_ids = completion_ids + [eos]
    return prompt_ids, completion_ids


def tokenize_prompt(prompt_text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt (the chat template already holds any special tokens the model expects)."""
    return tokenizer(prompt_text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


def check_columns(dataset: Dataset, name: str, field: str = "dataset") -> None:
    """Fail early, naming ``field``, when a split is empty or lacks the task-data columns."""
    if len(dataset) == 0:
        raise L3MDataError(f"{field}: the {name} split is empty")
    columns = set(dataset.column_names)
    if "messages" not in columns and not {"prompt", "completion"} <= columns:
        raise L3MDataError(
            f"{field}: the {name} split has columns {sorted(columns)}; expected 'messages' or 'prompt' and "
            "'completion' (rename yours with dataset.rename_column)"
        )


def prepare_dataset(dataset: Dataset, tokenizer, max_length: int, seed: int = 42, name: str = "train",
                    field: str = "dataset") -> Dataset:
    """Render and tokenize a task split into ``prompt``, ``prompt_ids``, ``completion_ids`` and ``reference``.

    Examples longer than ``max_length`` tokens are dropped and counted; an empty result is an error. ``field``
    names the input in error messages.
    """
    columns = set(dataset.column_names)
    if "prompt_ids" in columns and "completion_ids" in columns:
        return dataset
    check_columns(dataset, name, field)

    def encode(example, rng):
        prompt_text, completion_text, reference = render_example(example, tokenizer, rng)
        prompt_ids, completion_ids = tokenize_example(prompt_text, completion_text, tokenizer)
        return {"prompt": prompt_text, "reference": reference, "prompt_ids": prompt_ids,
                "completion_ids": completion_ids}

    return _encode_split(dataset, encode, max_length, seed, name, name, "examples")


def _encode_split(dataset: Dataset, encode, max_length: int, seed: int, name: str, label: str, noun: str) -> Dataset:
    """``dataset`` mapped through ``encode(example, rng)`` (``rng`` seeded by ``seed`` and the example's index, so
    that a random choice such as the answered turn depends on nothing else; a data error names the example of split
    ``name``), less the rows whose prompt and completion exceed ``max_length`` tokens, counted in a warning; none
    left is an error. ``label`` names the data in progress bars and messages, ``noun`` its rows."""

    def _encode(example, idx):
        try:
            return encode(example, random.Random(seed * 1_000_003 + idx))
        except L3MDataError as err:
            raise L3MDataError(f"{err} (in {name} example {idx})") from None

    encoded = dataset.map(_encode, with_indices=True, remove_columns=dataset.column_names,
                          desc=f"Tokenizing {label}")
    kept = encoded.filter(lambda ex: len(ex["prompt_ids"]) + len(ex["completion_ids"]) <= max_length,
                          desc=f"Filtering {label} to max_length")
    dropped = len(encoded) - len(kept)
    if dropped:
        logger.warning("%s: dropped %d of %d %s longer than max_length=%d", label, dropped, len(encoded), noun,
                       max_length)
    if len(kept) == 0:
        raise L3MDataError(f"max_length: all {len(encoded)} {label} {noun} exceed {max_length} tokens; raise it")
    return kept


def check_prompt_columns(dataset: Dataset, name: str = "train", field: str = "train_dataset") -> None:
    """Fail early, naming ``field``, when a split of prompts is empty or has neither ``prompt`` nor ``messages``."""
    columns = set(dataset.column_names)
    if len(dataset) == 0:
        raise L3MDataError(f"{field}: the {name} split is empty")
    if not columns & {"prompt", "messages"}:
        raise L3MDataError(f"{field}: the {name} split has columns {sorted(columns)}; expected 'prompt' or 'messages'")


def prepare_prompts(dataset: Dataset, tokenizer, max_length: int, seed: int = 42, name: str = "train",
                    field: str = "constraint_dataset") -> Dataset:
    """Render and tokenize prompts that constraint steps sample responses for, in :func:`prepare_dataset`'s columns
    with an empty ``completion_ids`` and ``reference``: prompts without answers (e.g. the prompts a model will be
    deployed on), which an objective step never reads.

    Accepted: task data (``messages``, whose prompt is the dialogue before one random assistant turn as in
    training, or the whole conversation when it ends with a user turn; ``prompt``/``completion``, whose prompt is
    kept) or a ``prompt`` column alone (text used as it is, or a list of messages rendered with the chat template's
    generation prompt). Prompts longer than ``max_length`` tokens are dropped and counted.
    """
    check_prompt_columns(dataset, name, field)

    def encode(example, rng):
        prompt_text = _prompt_text(example, tokenizer, rng, field)
        return {"prompt": prompt_text, "reference": "", "prompt_ids": tokenize_prompt(prompt_text, tokenizer),
                "completion_ids": []}

    return _encode_split(dataset, encode, max_length, seed, name, field, "prompts")


def _prompt_text(example: dict[str, Any], tokenizer, rng: random.Random, field: str) -> str:
    messages = example.get("messages")
    if messages is not None:
        check_messages(messages, "messages")
        if messages and messages[-1]["role"] == "user":
            return render_prompt(messages, tokenizer)
        return render_prompt(split_conversation(example, rng)[0], tokenizer)
    prompt = example.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        check_messages(prompt, "prompt")
        return render_prompt(prompt, tokenizer)
    raise L3MDataError(f"{field}: expected a prompt as text or a list of messages, got {prompt!r}")


def with_constraint_prompts(train: Dataset, prompts: Dataset) -> Dataset:
    """``train`` (prepared task data) followed by ``prompts`` (:func:`prepare_prompts`), in the columns both have:
    one dataset for the trainer's sampler, whose constraint steps read only the rows after ``len(train)``."""
    from datasets import concatenate_datasets

    columns = [c for c in train.column_names if c in prompts.column_names]
    train = train.select_columns(columns)
    return concatenate_datasets([train, prompts.select_columns(columns).cast(train.features)])


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, P)`` ids and attention mask, padded on the left (for generation)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


class CompletionCollator:
    """Collate tokenized examples for both step kinds.

    Returns ``input_ids``/``attention_mask`` ``(B, T)`` (right padded prompt + completion), ``labels`` with
    ``-100`` on prompt and padding (the objective's response-only mask), and left-padded ``prompt_input_ids`` /
    ``prompt_attention_mask`` ``(B, P)`` for sampling in constraint steps. Prompt texts are passed through for
    text-based rewards.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        full = [ex["prompt_ids"] + ex["completion_ids"] for ex in examples]
        width = max(len(s) for s in full)
        input_ids = torch.full((len(full), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for i, (ex, seq) in enumerate(zip(examples, full)):
            input_ids[i, : len(seq)] = torch.tensor(seq)
            attention_mask[i, : len(seq)] = 1
            start = len(ex["prompt_ids"])
            labels[i, start: len(seq)] = torch.tensor(ex["completion_ids"])
        prompt_input_ids, prompt_attention_mask = left_pad([ex["prompt_ids"] for ex in examples], self.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "prompt_input_ids": prompt_input_ids,
            "prompt_attention_mask": prompt_attention_mask,
            "prompts": [ex.get("prompt", "") for ex in examples],
        }
