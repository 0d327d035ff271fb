"""Preference data ``(x, y+, y-)`` for learning reward models (App. A.1 of the L3M paper).

Accepted formats (TRL's preference formats, and Anthropic HH's raw one):

- ``prompt`` / ``chosen`` / ``rejected``: strings (standard), or lists of messages (conversational: ``chosen`` and
  ``rejected`` hold the assistant turn).
- ``chosen`` / ``rejected`` only (implicit prompt): whole conversations, either as lists of messages or as raw HH
  transcripts ``"\\n\\nHuman: ... \\n\\nAssistant: ..."``. The last assistant turn is the response and the dialogue
  before it the prompt; a pair whose two dialogues differ before the last turn is dropped (and counted).

Each pair is rendered as the policy's data is (:func:`l3m.data.render_example`: the prompt through the tokenizer's
chat template) and tokenized with :func:`l3m.data.tokenize_example`, so a reward model trained on it sees prompts
and responses exactly as :class:`l3m.rewards.models.ModelReward` later presents them.
"""

from __future__ import annotations

import logging
import random
import re
from typing import Any

from datasets import Dataset

from l3m.data import render_example, tokenize_example
from l3m.errors import L3MDataError

logger = logging.getLogger(__name__)

_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an Anthropic HH transcript into ``messages``.

    >>> parse_hh_transcript("\\n\\nHuman: Hi there\\n\\nAssistant: Hello!")
    [{'role': 'user', 'content': 'Hi there'}, {'role': 'assistant', 'content': 'Hello!'}]
    """
    parts = _HH_TURN.split(text)
    # parts = [text before the first turn, role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise L3MDataError("chosen: a transcript does not start with '\\n\\nHuman: '; expected Anthropic HH's "
                           "format '\\n\\nHuman: ... \\n\\nAssistant: ...'")
    return [{"role": _HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def _split_dialogue(dialogue: Any) -> tuple[list[dict], str]:
    """``(prompt messages, response)`` of a whole conversation: the last turn must be the assistant's."""
    messages = parse_hh_transcript(dialogue) if isinstance(dialogue, str) else list(dialogue)
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        raise L3MDataError("chosen: a conversation does not end with an assistant turn; the last turn is the "
                           "response of a preference pair")
    return messages[:-1], messages[-1]["content"]


def _response_text(response: Any) -> str:
    """A response given as a string, or as a list of messages whose last one is the assistant turn."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and response and isinstance(response[-1], dict):
        return response[-1]["content"]
    raise L3MDataError(f"chosen: expected a response string or a list of messages, got {type(response).__name__}")


def standardize_pair(example: dict[str, Any]) -> dict[str, Any] | None:
    """``{"prompt", "chosen", "rejected"}`` with response strings; None when HH dialogues differ before the end."""
    if example.get("prompt") is not None:
        return {"prompt": example["prompt"], "chosen": _response_text(example["chosen"]),
                "rejected": _response_text(example["rejected"])}
    prompt, chosen = _split_dialogue(example["chosen"])
    rejected_prompt, rejected = _split_dialogue(example["rejected"])
    if rejected_prompt != prompt:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def check_preference_columns(dataset: Dataset, name: str, field: str = "dataset_name") -> None:
    """Fail early, naming ``field``, when a split is empty or lacks ``chosen``/``rejected``."""
    if len(dataset) == 0:
        raise L3MDataError(f"{field}: the {name} split is empty")
    if not {"chosen", "rejected"} <= set(dataset.column_names):
        raise L3MDataError(f"{field}: the {name} split has columns {sorted(dataset.column_names)}; preference data "
                           "needs 'chosen' and 'rejected' (and 'prompt', or HH transcripts that contain it)")


def prepare_preference_dataset(dataset: Dataset, tokenizer, max_length: int, name: str = "train",
                               field: str = "dataset_name") -> Dataset:
    """Render and tokenize pairs into ``prompt`` (text), ``chosen``/``rejected`` (response text), ``prompt_ids``,
    ``chosen_ids`` and ``rejected_ids``; pairs longer than ``max_length`` tokens are dropped and counted."""
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
        return dataset
    check_preference_columns(dataset, name, field)
    rows, mismatched = [], 0
    for example in dataset:
        pair = standardize_pair(example)
        if pair is None:
            mismatched += 1
            continue
        prompt = pair["prompt"]
        conversation = prompt if isinstance(prompt, list) else str(prompt)
        completion = [{"role": "assistant", "content": pair["chosen"]}] if isinstance(prompt, list) else pair["chosen"]
        prompt_text = render_example({"prompt": conversation, "completion": completion}, tokenizer,
                                     random.Random(0))[0]
        prompt_ids, chosen_ids = tokenize_example(prompt_text, pair["chosen"], tokenizer)
        _, rejected_ids = tokenize_example(prompt_text, pair["rejected"], tokenizer)
        if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length:
            continue
        rows.append({"prompt": prompt_text, "chosen": pair["chosen"], "rejected": pair["rejected"],
                     "prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    if mismatched:
        logger.warning("%s: dropped %d of %d pairs whose chosen and rejected dialogues differ before the last turn",
                       name, mismatched, len(dataset))
    dropped = len(dataset) - mismatched - len(rows)
    if dropped:
        logger.warning("%s: dropped %d of %d pairs longer than max_length=%d", name, dropped, len(dataset),
                       max_length)
    if not rows:
        raise L3MDataError(f"max_length: none of the {len(dataset)} {name} pairs is usable (all longer than "
                           f"{max_length} tokens, or with mismatched dialogues); raise it or check the data")
    return Dataset.from_list(rows)


class PairCollator:
    """Collate tokenized pairs into one batch of ``2B`` sequences: the ``B`` chosen, then the ``B`` rejected.

    Returns ``input_ids``/``attention_mask``/``labels`` ``(2B, T)`` as :class:`l3m.data.CompletionCollator` does
    (labels ``-100`` outside the response), so one forward pass scores both sides.
    """

    def __init__(self, pad_token_id: int):
        from l3m.data import CompletionCollator

        self.collate = CompletionCollator(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sides = [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex[key]}
                 for key in ("chosen_ids", "rejected_ids") for ex in examples]
        batch = self.collate(sides)
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
