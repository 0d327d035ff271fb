"""The demo's shift test (issue 15, item 6): whole chatterbot categories held out of training."""

from __future__ import annotations

import pytest
from datasets import Dataset

from l3m.errors import L3MConfigError
from l3m.experiments.demo import demo_table, shift_splits


def _split(categories: list[str]) -> Dataset:
    return Dataset.from_list([{"category": c, "messages": [{"role": "user", "content": f"{c} {i}"},
                                                           {"role": "assistant", "content": "ok"}]}
                              for i, c in enumerate(categories)])


def test_held_out_categories_leave_every_split_and_make_the_shift_set():
    splits = {"train": _split(["tech"] * 6 + ["trivia"] * 3), "test": _split(["tech", "trivia", "history"])}
    kept, shift, rest = shift_splits(splits, ["trivia", "history"], size=3, seed=0)
    assert set(kept["train"]["category"]) == {"tech"} and len(kept["train"]) == 6
    assert kept["test"]["category"] == ["tech"]
    assert len(shift) == 3 and set(shift["category"]) <= {"trivia", "history"}
    # the other two held-out conversations: the constraint prompts of --shift_prompts, never the evaluated ones
    questions = {name: {m[0]["content"] for m in split["messages"]} for name, split in (("shift", shift), ("rest", rest))}
    assert len(rest) == 2 and not questions["rest"] & questions["shift"]
    _, everything, none_left = shift_splits(splits, ["trivia", "history"], size=100, seed=0)
    assert len(everything) == 5 and len(none_left) == 0  # 3 + 1 trivia, 1 history: at most what exists
    assert shift_splits(splits, [], size=3, seed=0) == (splits, None, None)


def test_an_unknown_category_is_a_one_line_error_that_lists_the_known_ones():
    with pytest.raises(L3MConfigError, match=r"^shift_categories: unknown category \['sprots'\]; the demo data has "
                                             r"\['tech', 'trivia'\]$"):
        shift_splits({"train": _split(["tech", "trivia"])}, ["sprots"], size=3, seed=0)


def test_the_table_gains_the_shift_columns_only_with_a_shift_test():
    summary = {"length_mean": 6.0, "length_std": 2.0, "length/satisfied": True, "length/inside_frac": 0.7,
               "log_ppl_mean": 2.0, "log_ppl_std": 0.5}
    record = {"run": {"name": "L3M [2, 8]", "length_min": 2, "length_max": 8}, "steps": 10, "summary": summary,
              "train_seconds": 1.0}
    assert "shift" not in demo_table([record])
    shifted = {**record, "shift": {"summary": {**summary, "length_mean": 9.4, "length/satisfied": False}}}
    row = demo_table([shifted]).splitlines()[-1]
    assert row.split()[-4:] == ["9.4", "±", "2.0", "NO"]


def test_shift_prompts_without_categories_is_a_one_line_error():
    from l3m.experiments.demo import DemoSettings

    with pytest.raises(L3MConfigError, match=r"^shift_prompts: needs shift_categories"):
        DemoSettings(shift_prompts=True)
