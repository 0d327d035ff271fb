"""Sharing each prompt's prefix across its G samples changes no result: same samples, same log-probs, same gradients.

The log-prob pass scores at the sampling temperature; at temperature 1 it computes what it computed before it took one.

And a deprecated call like the ones the sampler used to make fails the suite when l3m makes it, not when a library does.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from fixtures.scoring import brute_force_logps
from fixtures.tiny import WORDS, build_model, build_tokenizer
from l3m.sampling import (completion_logps, length_normalized_logps, position_ids_from, prompt_cache, response_nll,
                          sample_completions)


def _prompts(tokenizer):
    texts = ["please say w1 w2 w3 w4 w5", "count w7", "say w9 w10 w11"]  # different lengths: left padding
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def test_shared_prompt_generation_samples_what_repeated_prompts_sample():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    ids, mask = _prompts(tokenizer)
    common = dict(stop_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, max_new_tokens=6, top_k=1)
    shared = sample_completions(model, ids, mask, num_generations=3, **common)
    repeated = sample_completions(model, ids.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0),
                                  num_generations=1, **common)
    assert shared.group_size == 3 and repeated.group_size == 1
    assert torch.equal(shared.sequences, repeated.sequences)
    assert shared.completion_ids == repeated.completion_ids


def test_shared_prompt_logps_and_gradients_equal_whole_sequence_ones():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    completions = _sampled(model, tokenizer)
    whole = lambda m, c: completion_logps(m, dataclasses.replace(c, group_size=1))  # noqa: E731 (whole sequences)
    _assert_same_logps_and_gradients(model, completions, completion_logps, whole)


def _assert_same_logps_and_gradients(model, completions, first, second):
    """``first(model, completions)`` and ``second(...)`` give the same log-probs and the same gradients of a
    weighted sum of them, in training mode."""
    model.train()
    results = []
    for logps_of in (first, second):
        model.zero_grad()
        logps = logps_of(model, completions)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logps_a, grads_a), (logps_b, grads_b) = results
    torch.testing.assert_close(logps_a, logps_b, rtol=1e-5, atol=1e-5)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_a[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _sampled(model, tokenizer, seed: int = 0, max_new_tokens: int = 8, **kwargs):
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(seed)
    completions = sample_completions(model, ids, mask, stop_ids=[tokenizer.eos_token_id],
                                     pad_token_id=tokenizer.pad_token_id, num_generations=4,
                                     max_new_tokens=max_new_tokens, **kwargs)
    assert len({len(c) for c in completions.completion_ids}) > 1  # responses of different lengths
    return completions


def _logps_before_temperature(model, completions):
    """completion_logps as it was before it scored at the sampling temperature (verbatim but for the names)."""
    num_logits = completions.completion_mask.shape[1]
    group, prompt_length = completions.group_size, completions.prompt_mask.shape[1]
    rows = torch.arange(completions.sequences.shape[0]) // group
    shared = prompt_cache(model, completions.sequences[::group, :prompt_length], completions.prompt_mask[::group],
                          rows) if group > 1 else None
    if shared is None:
        mask = completions.attention_mask
        logits = model(input_ids=completions.sequences, attention_mask=mask, position_ids=position_ids_from(mask),
                       use_cache=False, logits_to_keep=num_logits + 1).logits
        logits = logits[:, :-1].float()
        targets = completions.sequences[:, -num_logits:]
        logps = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        return length_normalized_logps(logps, completions.completion_mask)
    cache, first_logits = shared
    mask = completions.attention_mask
    targets = completions.sequences[:, prompt_length:]
    logits = model(input_ids=targets, attention_mask=mask, position_ids=position_ids_from(mask)[:, prompt_length:],
                   cache=cache, use_cache=True, logits_to_keep=num_logits).logits
    logits = torch.cat([first_logits, logits[:, :-1]], dim=1).float()
    logps = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return length_normalized_logps(logps, completions.completion_mask)


@pytest.mark.parametrize("group", [4, 1])
def test_logps_at_temperature_one_equal_those_before_the_temperature_bit_for_bit(group):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    completions = dataclasses.replace(_sampled(model, tokenizer), group_size=group)
    model.train()  # as in the constraint step
    with torch.no_grad():
        before = _logps_before_temperature(model, completions)
    assert torch.equal(completion_logps(model, completions), before)
    assert torch.equal(completion_logps(model, completions, temperature=1.0), before)


@pytest.mark.parametrize("group", [4, 1])
def test_logps_at_a_temperature_are_the_log_softmax_of_the_scaled_logits(group):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    completions = dataclasses.replace(_sampled(model, tokenizer, temperature=0.7), group_size=group)
    model.train()
    logps = completion_logps(model, completions, temperature=0.7)
    assert logps.requires_grad  # the pass the gradient is taken through
    torch.testing.assert_close(logps.detach(), brute_force_logps(model, completions, 0.7), rtol=1e-5, atol=1e-5)
    # and not the temperature-1 values: the check can tell them apart
    assert (brute_force_logps(model, completions, 1.0) - logps.detach()).abs().max() > 1e-2


def test_response_nll_over_response_positions_only_equals_the_full_computation():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 0], [5, 6, 12, 13, 14, 15, 16, 17]])
    mask = (ids != 0).long()
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = ids[0, 4:7]  # response starts at 4
    labels[1, 3:] = ids[1, 3:]  # response starts at 3: the output layer runs from position 2 on
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
    expected = token_nll.sum(dim=1) / (labels[:, 1:] != -100).sum(dim=1)
    torch.testing.assert_close(response_nll(model, ids, mask, labels), expected)


# the sampler's calls before transformers renamed past_key_values to cache (both still work, with a FutureWarning)
DEPRECATED_CALLS = {
    "generate": "model.generate(input_ids=ids, past_key_values=None, max_new_tokens=1, do_sample=False)",
    "forward": "model(input_ids=ids, past_key_values=None)",  # via nn.Module.__call__: see conftest.blame_module_callers
}


def _run_as(module_name: str, source: str, **names) -> dict:
    """Run ``source`` as code of the module ``module_name`` (the module its warnings are attributed to)."""
    namespace = {"__name__": module_name, **names}
    exec(compile(source, f"<{module_name}>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("call", sorted(DEPRECATED_CALLS))
def test_a_deprecated_call_from_l3m_code_fails_under_the_configured_filters(call):
    model = build_model(build_tokenizer())
    with pytest.raises(FutureWarning, match="`past_key_values` is deprecated"):
        _run_as("l3m.sampling", DEPRECATED_CALLS[call], model=model, ids=torch.tensor([[5, 6, 7]]))


def test_a_deprecated_call_inside_a_library_stays_a_warning_even_when_l3m_called_the_library(blame_module_callers):
    model = build_model(build_tokenizer())
    library = _run_as("transformers.some_pipeline",
                      "def run(model, ids):\n" + "".join(f"    {call}\n" for call in DEPRECATED_CALLS.values()))
    with warnings.catch_warnings(record=True) as caught:  # keeps the configured filters
        blame_module_callers()  # catch_warnings(record=True) swapped it out for its recorder
        _run_as("l3m.sampling", "run(model, ids)", run=library["run"], model=model, ids=torch.tensor([[5, 6, 7]]))
    deprecations = [(w.category, w.filename) for w in caught if "`past_key_values` is deprecated" in str(w.message)]
    assert deprecations == [(FutureWarning, "<transformers.some_pipeline>")] * len(DEPRECATED_CALLS)


# ------------------------------------------------------------------------------------- the nucleus sampler

def _transformers_nucleus(logits, top_p, top_k):
    """The distribution ``generate(do_sample=True)`` samples from: TopK then TopP warpers, then softmax."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.clone()
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(dim=-1)


def _on_vocabulary(probs, ids, vocab_size):
    return torch.zeros(probs.shape[0], vocab_size).scatter_add_(1, ids, probs)


@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.5, 0), (0.99, 0), (0.9, 50), (1.0, 50), (1.0, 0)])
def test_nucleus_is_the_distribution_of_transformers_top_k_top_p_warpers(scale, top_p, top_k):
    """Same kept tokens, same probabilities, for peaked (nucleus inside the candidates) and flat (sorted in full)
    distributions."""
    from l3m.sampling import nucleus

    torch.manual_seed(0)
    logits = torch.randn(8, 5000) * scale
    probs, ids = nucleus(logits, top_p, top_k, candidates=64)
    ours, theirs = _on_vocabulary(probs, ids, 5000), _transformers_nucleus(logits, top_p, top_k)
    assert torch.equal(ours > 0, theirs > 0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_nucleus_widens_the_search_only_for_rows_whose_candidates_miss_top_p_of_the_mass():
    from l3m.sampling import nucleus

    torch.manual_seed(1)
    peaked, flat = torch.randn(3, 2000) * 8, torch.randn(3, 2000) * 0.1
    logits = torch.cat([peaked, flat])[torch.tensor([0, 3, 1, 4, 2, 5])]  # interleaved
    probs, ids = nucleus(logits, 0.9, candidates=16)
    assert probs.shape[1] == 2000  # the flat rows needed the whole vocabulary (16, then 256, then all)
    kept = (probs > 0).sum(dim=1)
    assert kept[::2].max() <= 16 < 256 < kept[1::2].min()
    torch.testing.assert_close(_on_vocabulary(probs, ids, 2000), _transformers_nucleus(logits, 0.9, 0),
                               atol=1e-6, rtol=1e-5)
    middle = torch.cat([peaked, torch.randn(1, 2000) * 2.5])  # a nucleus of 17..256 tokens: 256 suffice
    probs, ids = nucleus(middle, 0.9, candidates=16)
    assert probs.shape[1] == 256 and 16 < (probs[-1] > 0).sum() <= 256
    torch.testing.assert_close(_on_vocabulary(probs, ids, 2000), _transformers_nucleus(middle, 0.9, 0),
                               atol=1e-6, rtol=1e-5)


def test_nucleus_sampler_draws_each_token_at_its_nucleus_probability_at_the_temperature():
    from l3m.sampling import NucleusSampler, nucleus

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    temperature, top_p = 0.7, 0.8
    expected = _on_vocabulary(*nucleus(logits / temperature, top_p), 6)[0]
    assert (expected == 0).sum() >= 2  # the test exercises truncation
    torch.manual_seed(0)
    draws = 40_000
    tokens = NucleusSampler(temperature, top_p)(logits.expand(draws, 6), torch.rand(draws))
    frequency = torch.bincount(tokens, minlength=6) / draws
    standard_error = (expected * (1 - expected) / draws).sqrt()
    assert torch.all((frequency - expected).abs() <= 4 * standard_error + 1e-9)


def test_nucleus_sampler_takes_the_token_whose_cumulative_probability_passes_the_uniform():
    from l3m.sampling import NucleusSampler

    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(4, 3)
    tokens = NucleusSampler()(logits, torch.tensor([0.0, 0.49, 0.51, 0.999]))
    assert tokens.tolist() == [0, 0, 1, 2]


def test_finished_responses_leave_the_batch_without_changing_the_others():
    """Rows that end are dropped from the decoding batch; ``synced`` keeps every row to ``max_new_tokens``. The same
    seed gives the same responses either way, of different lengths, some stopped and some truncated."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    ids, mask = _prompts(tokenizer)
    common = dict(stop_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, max_new_tokens=8,
                  num_generations=4)
    runs = []
    for synced in (False, True):
        torch.manual_seed(3)
        runs.append(sample_completions(model, ids, mask, synced=synced, **common))
    dropped, kept = runs
    assert len({len(c) for c in dropped.completion_ids}) > 2
    assert 0 < int(dropped.truncated.sum()) < len(dropped.truncated)
    assert dropped.completion_ids == kept.completion_ids
    assert torch.equal(dropped.truncated, kept.truncated)
    length = dropped.completion_mask.shape[1]
    assert torch.equal(dropped.completion_mask, kept.completion_mask[:, :length])
    assert not kept.completion_mask[:, length:].any()


def test_the_log_prob_pass_by_length_groups_gives_the_one_pass_logps_and_gradients():
    """Responses of very different lengths go through the model in several groups, each padded to its own longest;
    log-probs and gradients are those of one pass over every row padded to the longest response."""
    from l3m.sampling import _completion_logps, length_groups

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    completions = _sampled(model, tokenizer, seed=1, max_new_tokens=40)
    lengths = completions.completion_mask.sum(dim=1)
    groups = length_groups(lengths, torch.arange(len(lengths)) // 4, completions.prompt_mask[::4].sum(dim=1))
    assert len(groups) > 1 and sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    assert all(lengths[a].max() <= lengths[b].min() for a, b in zip(groups, groups[1:]))
    one_pass = lambda m, c: _completion_logps(m, c, torch.arange(len(lengths)), 1.0)  # noqa: E731
    _assert_same_logps_and_gradients(model, completions, completion_logps, one_pass)


def test_length_groups_find_the_cheapest_split_of_the_sorted_rows():
    """Against every split of the length-sorted rows into runs (2^(N-1) of them), on random small cases."""
    import itertools
    import random

    from l3m.sampling import length_groups

    def cost(groups, lengths, prompts, tokens, pass_tokens):
        return sum(len(g) * int(lengths[g].max()) + pass_tokens + sum(int(tokens[p]) for p in set(prompts[g].tolist()))
                   for g in groups)

    rng = random.Random(0)
    for _ in range(200):
        n, per_prompt = rng.randint(1, 7), rng.choice([1, 2, 4])
        lengths = torch.tensor([rng.randint(0, 64) for _ in range(n)])
        prompts = torch.arange(n) // per_prompt
        tokens = torch.tensor([rng.randint(0, 40) for _ in range(int(prompts.max()) + 1)])
        order = lengths.argsort(stable=True)
        cheapest = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], lengths, prompts, tokens, 16)
                       for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        assert cost(length_groups(lengths, prompts, tokens), lengths, prompts, tokens, 16) == cheapest


def test_length_groups_keep_equal_lengths_together_and_set_a_long_response_apart():
    from l3m.sampling import length_groups

    prompts, prompt_tokens = torch.arange(8) // 4, torch.tensor([30, 30])
    assert [len(g) for g in length_groups(torch.full((8,), 5), prompts, prompt_tokens)] == [8]
    lengths = torch.tensor([4, 5, 64, 3, 6, 4, 5, 2])
    groups = length_groups(lengths, prompts, prompt_tokens)
    assert groups[-1].tolist() == [2]  # the 64-token response alone; the others padded to 6, not 64


def test_the_shared_prompt_gradient_is_the_same_bits_on_every_repeat():
    """The G responses to a prompt share its KV cache and first logits (prompt_cache), so the backward adds G
    gradients into each prompt's rows; the log-prob pass orders rows by length, so the repeats are interleaved.
    Indexing added them with atomics on two threads, in an order that changed from run to run (and every demo L3M
    ended elsewhere); the gradient must be the same bits every time. A vocabulary of 16k words makes the repeated
    logits large enough for torch to split the adds between threads."""
    tokenizer = build_tokenizer(words=WORDS + [f"x{i}" for i in range(16000)])
    model = build_model(tokenizer)
    ids, mask = _prompts(tokenizer)
    rows = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1] * 2)
    weights = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        seen = set()
        for _ in range(12):
            model.zero_grad()
            cache, logits = prompt_cache(model, ids, mask, rows)
            outputs = [logits] + [t for layer in cache.layers for t in (layer.keys, layer.values)]
            weights.manual_seed(0)
            sum((t * torch.randn(t.shape, generator=weights)).sum() for t in outputs).backward()
            seen.add(b"".join(p.grad.numpy().tobytes() for p in model.parameters()))
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1
