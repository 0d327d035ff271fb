"""The offline helpful/harmless stand-in: its two real scorers and how pairs are labelled (no demo model needed)."""

from __future__ import annotations

import pytest

from l3m.rewards.standin import RelevanceScorer, _statistics, civility_scores, label_pairs, StandinSettings


def test_civility_prefers_kind_words_and_relevance_prefers_on_topic_answers():
    rude, kind = civility_scores(["You are an idiot and I hate this stupid question.",
                                  "Thank you, I am happy to help you!"])
    assert rude < -0.5 < 0.5 < kind
    relevance = RelevanceScorer()
    prompt = "My printer is not printing."
    on_topic, off_topic = relevance([prompt, prompt], ["Check that the printer has paper and restart it.",
                                                       "Have a lovely day, the sunshine is wonderful!"])
    assert on_topic > off_topic + 0.3
    assert -1.0 <= off_topic and on_topic <= 1.0


def _candidate(response, helpful, harmless, source="sample"):
    return {"prompt": "q", "source": source, "response": response, "helpful": helpful, "harmless": harmless}


def test_pairs_take_the_higher_score_and_skip_close_calls():
    group = [_candidate("a", 0.9, -0.5), _candidate("b", 0.2, 0.8), _candidate("c", 0.85, 0.75),
             _candidate("a", 0.0, 0.1)]
    helpful = label_pairs("q", group, "helpful", min_gap=0.1)
    # a-c differ by 0.05 < 0.1 and a-a is one text twice: no pairs
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in helpful] == [
        ("a", "b"), ("c", "b"), ("b", "a"), ("c", "a")]
    assert helpful[0]["prompt"] == [{"role": "user", "content": "q"}]
    assert helpful[0]["margin"] == pytest.approx(0.7)
    harmless = label_pairs("q", group, "harmless", min_gap=0.1)
    assert ("b", "a") == (harmless[0]["chosen"][0]["content"], harmless[0]["rejected"][0]["content"])

    stats = _statistics(group, {"q": group}, StandinSettings(min_gap=0.1))
    assert stats["num_candidates"] == 4
    # decided by both scores: a-b (helpful prefers a, harmless b), b-a' and c-a' (both prefer the first);
    # a-c and b-c are close calls for one score, a-a' is one text twice
    assert stats["pairs_labelled_by_both"] == 3 and stats["pair_agreement"] == pytest.approx(2 / 3)


def test_build_standin_writes_pairs_and_statistics_once(tmp_path):
    import json

    from fixtures.tiny import build_model, build_tokenizer
    from l3m.rewards.standin import build_standin

    model_dir = tmp_path / "tiny"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_model(tokenizer).save_pretrained(model_dir)
    prompts = [{"prompt": "please say w1 w2", "answer": "w1 w2", "category": "toy"},
               {"prompt": "count w3", "answer": "w3 w4 w5", "category": "toy"}]
    settings = StandinSettings(samples_per_prompt=3, deflections_per_prompt=0, max_new_tokens=6, min_gap=0.0,
                               test_fraction=0.5)
    paths = build_standin(settings, str(tmp_path / "standin"), model_path=str(model_dir), prompts=prompts)
    candidates = [json.loads(line) for line in open(paths["candidates"])]
    assert {c["source"] for c in candidates} <= {"corpus", "sample"} and len(candidates) >= 4
    assert all(-1 <= c["harmless"] <= 1 and -1 <= c["helpful"] <= 1 for c in candidates)
    stats = json.load(open(paths["stats"]))
    assert stats["num_prompts"] == 2 and stats["num_candidates"] == len(candidates)
    from l3m.data import load_task_splits

    for name in ("helpful", "harmless"):
        splits = load_task_splits(paths[name], validation_size=1)  # train.jsonl and test.jsonl are kept as splits
        assert {k: len(v) for k, v in splits.items() if k != "validation"} == {
            "train": stats["num_pairs"][name]["train"] - 1, "test": stats["num_pairs"][name]["test"]}
        prompts_of = {k: {p["prompt"][0]["content"] for p in v} for k, v in splits.items()}
        assert len(prompts_of["test"]) == 1 and not prompts_of["test"] & prompts_of["train"]  # split by prompt
        score = {(c["prompt"], c["response"]): c[name] for c in candidates}
        for pair in splits["train"]:
            prompt = pair["prompt"][0]["content"]
            assert score[prompt, pair["chosen"][0]["content"]] >= score[prompt, pair["rejected"][0]["content"]]
    # cached: a second call with the same settings returns the same files without rebuilding
    mtime = (tmp_path / "standin" / "stats.json").stat().st_mtime_ns
    assert build_standin(settings, str(tmp_path / "standin"), model_path="/nonexistent") == paths
    assert (tmp_path / "standin" / "stats.json").stat().st_mtime_ns == mtime
