"""Sampling responses from the policy, and length-normalized response log-likelihoods.

The log-prob pass scores responses under the distribution they were sampled from, as far as the REINFORCE estimate
needs (docs/solver.md, "What the log-prob pass scores"): at the sampling temperature (``log_softmax(logits / T)``),
over the full vocabulary (top-p / top-k truncation is not renormalized), with dropout off as in generation.

Shapes: B prompts, G samples per prompt, N = B*G responses, P prompt tokens (left padded), L completion tokens.

The G responses to one prompt share its prefix: generation and the log-prob pass of a constraint step run the prompt
through the model once per prompt (not once per response) and repeat its KV cache G times (:func:`prompt_cache`).
With G = 4 and chat prompts longer than the responses this removes most of the prompt's compute. Gradient
checkpointing turns the KV cache off in training mode, so the log-prob pass then falls back to whole sequences.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from l3m.packed_linear import packed_linears

NUCLEUS_CANDIDATES = 256  # largest logits searched for the top-p nucleus first (then 16x as many, up to all)
PASS_OVERHEAD_TOKENS = 16  # a log-prob pass's fixed cost, in tokens, when responses are grouped by length


@dataclass
class Completions:
    """Sampled responses: ``sequences`` ``(N, P+L)`` = left-padded prompt then completion; masks mark real tokens."""

    sequences: torch.Tensor
    prompt_mask: torch.Tensor  # (N, P)
    completion_mask: torch.Tensor  # (N, L): completion tokens up to and including the first EOS
    completion_ids: list[list[int]]  # per response, without the EOS
    truncated: torch.Tensor  # (N,) True where no EOS was produced within max_new_tokens
    group_size: int = 1  # G: rows i*G .. i*G+G-1 answer the same prompt

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def position_ids_from(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask, so left-padded rows are handled like unpadded ones."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prompt_of_row: torch.Tensor):
    """Run ``B`` prompts through ``model`` once and give each of ``R`` rows the KV cache of its prompt.

    ``prompt_of_row`` ``(R,)`` holds each row's prompt index (``arange(B).repeat_interleave(G)`` for ``G`` samples of
    every prompt). Returns ``(cache, logits)``: the cache for the ``R`` rows and ``(R, 1, V)`` logits of the token after
    each row's prompt, or ``None`` when the model returned no cache (gradient checkpointing in training mode).
    Differentiable: the log-prob pass backpropagates through each shared prompt once.
    """
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from(prompt_mask),
                use_cache=True, logits_to_keep=1)
    if out.cache is None:
        return None
    # index_select, not indexing: with rows repeated and interleaved, the CPU backward of indexing adds the repeats
    # with parallel atomic adds, in an order that changed from run to run on two threads (and so did every L3M run's
    # outcome); index_select's backward adds them in order (on CUDA, in order under torch's deterministic mode).
    for layer in out.cache.layers:
        if layer.get_seq_length() > 0:
            layer.keys = layer.keys.index_select(0, prompt_of_row)
            layer.values = layer.values.index_select(0, prompt_of_row)
    return out.cache, out.logits.index_select(0, prompt_of_row)


def eos_ids(tokenizer, model) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def nucleus(logits: torch.Tensor, top_p: float, top_k: int = 0,
            candidates: int = NUCLEUS_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k / top-p (nucleus) distribution of ``softmax(logits)``, ``logits`` ``(N, V)``, on a few token ids.

    Returns ``(probs, ids)``, both ``(N, K)``: the probability of each kept token (0 for dropped ones; rows sum to
    1) and its id. It is the distribution transformers' ``TopKLogitsWarper`` then ``TopPLogitsWarper`` then softmax
    give (``tests/test_sampling.py`` checks it against them): a token is kept when the tokens more probable than it
    hold less than ``top_p`` of the mass, so the nucleus is the smallest prefix of the sorted vocabulary whose mass
    reaches ``top_p``. With ``top_k`` the mass is renormalized within the top ``top_k`` first.

    Sorting the whole vocabulary (49k entries for SmolLM2) at every decoding step costs more than the model's
    output layer at small batch; so without ``top_k`` only the ``candidates`` largest logits are searched
    (:func:`_candidate_probs`), with probabilities normalized over the full vocabulary. When they hold at least
    ``top_p`` of the mass the nucleus lies inside them and the result is exact; rows where they do not (a flat
    distribution) search 16 times as many, up to the whole vocabulary.
    """
    if top_p >= 1.0 and top_k <= 0:
        return logits.softmax(dim=-1), torch.arange(logits.shape[1], device=logits.device).expand_as(logits)
    if top_k > 0:
        probs, ids = _largest_probs(logits, top_k, within=True)
    else:
        probs, ids = _candidate_probs(logits, top_p, candidates)
    if top_p < 1.0:
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the more probable tokens
        probs = torch.where(mass_before < top_p, probs, torch.zeros_like(probs))
    return probs / probs.sum(dim=-1, keepdim=True), ids


def _largest_probs(logits: torch.Tensor, k: int, within: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable tokens of ``softmax(logits)``, largest first: probabilities normalized over the
    vocabulary, or over the ``k`` tokens when ``within``, and ids."""
    values, ids = logits.topk(min(k, logits.shape[1]), dim=-1)
    return (values - (values if within else logits).logsumexp(dim=-1, keepdim=True)).exp(), ids


def _candidate_probs(logits: torch.Tensor, top_p: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted probabilities and ids of each row's ``k`` largest logits; rows where they hold less than ``top_p`` of
    the mass get ``16 k`` (and so on, up to the vocabulary), the others are padded with probability 0."""
    probs, ids = _largest_probs(logits, k, within=False)
    uncovered = probs.sum(dim=-1) < top_p
    if probs.shape[1] == logits.shape[1] or not bool(uncovered.any()):
        return probs, ids
    wider_probs, wider_ids = _candidate_probs(logits[uncovered], top_p, 16 * k)
    pad = wider_probs.shape[1] - probs.shape[1]
    probs, ids = F.pad(probs, (0, pad)), F.pad(ids, (0, pad))
    probs[uncovered], ids[uncovered] = wider_probs, wider_ids
    return probs, ids


class NucleusSampler:
    """Draws tokens from :func:`nucleus` of ``softmax(logits / temperature)`` by inverse transform sampling: row
    ``n`` takes the first token whose cumulative nucleus probability exceeds ``uniforms[n]`` (one uniform number per
    row, drawn by the caller), so a row's token depends on its own logits and uniform only.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Token ids ``(N,)`` for logits ``(N, V)`` and uniforms ``(N,)`` in ``[0, 1)``."""
        probs, ids = nucleus(logits.float() / self.temperature, self.top_p, self.top_k)
        cumulative = probs.cumsum(dim=-1)
        position = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1]).unsqueeze(1), right=True)
        return ids.gather(1, position.clamp(max=ids.shape[1] - 1)).squeeze(1)


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    stop_ids: list[int],
    pad_token_id: int,
    num_generations: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.9,
    top_k: int = 0,
    synced: bool = False,
) -> Completions:
    """Sample ``num_generations`` responses per prompt from ``model`` with a KV cache and :class:`NucleusSampler`
    (temperature, top-k, top-p), one token per forward pass.

    A response ends at its first stop token, and its row leaves the batch then (its KV cache rows are dropped), so
    the decoding steps that follow run only the responses still going: a batch whose lengths differ, as a length
    constraint's do, costs about the sum of its lengths rather than the longest one times the batch. Each decoding step
    draws one uniform number for every response of the batch from torch's global generator, finished or not, so the
    responses do not depend on when the others ended (``tests/test_sampling.py`` checks them against a run that keeps
    every row to the end). With ``synced`` (several processes that must run the same forward passes, e.g. FSDP, which
    gathers the weights in each) every row runs all ``max_new_tokens`` steps; the responses are the same.

    The model is put in eval mode while generating (gradient checkpointing is a training-mode feature and would
    disable the KV cache; dropout is off as in the log-prob pass), and its previous mode is restored. On the CPU its
    float32 linear layers run with weights packed once for the call (:mod:`l3m.packed_linear`).
    """
    was_training = model.training
    model.eval()
    try:
        with packed_linears(model):
            completion = _decode(model, prompt_ids, prompt_mask, stop_ids, pad_token_id, num_generations,
                                 max_new_tokens, NucleusSampler(temperature, top_p, top_k), synced)
    finally:
        model.train(was_training)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    sequences = torch.cat([prompt_ids.repeat_interleave(num_generations, dim=0), completion], dim=1)
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device))
    has_stop = is_stop.any(dim=1)
    # index of the first stop token, or L when there is none
    first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), torch.full_like(has_stop, completion.shape[1],
                                                                                       dtype=torch.long))
    positions = torch.arange(completion.shape[1], device=completion.device).unsqueeze(0)
    completion_mask = (positions <= first_stop.unsqueeze(1)).long()
    completion_ids = [row[: int(n)].tolist() for row, n in zip(completion, first_stop)]
    return Completions(sequences, prompt_mask, completion_mask, completion_ids, ~has_stop, num_generations)


def _decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, stop_ids: list[int], pad_token_id: int,
            group_size: int, max_new_tokens: int, sampler: NucleusSampler, synced: bool) -> torch.Tensor:
    """The completion tokens ``(B*G, L)`` of :func:`sample_completions`, padded with ``pad_token_id`` after each
    stop token; ``L`` is the longest response's length (at most ``max_new_tokens``)."""
    device = prompt_ids.device
    rows = prompt_ids.shape[0] * group_size
    mask = prompt_mask.repeat_interleave(group_size, dim=0)
    if group_size > 1 and prompt_ids.shape[1] > 1:  # all of each prompt but its last token, once per prompt
        prompt_of_row = torch.arange(prompt_ids.shape[0], device=device).repeat_interleave(group_size)
        cache, _ = prompt_cache(model, prompt_ids[:, :-1], prompt_mask[:, :-1], prompt_of_row)
        inputs = prompt_ids[:, -1:].repeat_interleave(group_size, dim=0)
    else:
        cache, inputs = None, prompt_ids.repeat_interleave(group_size, dim=0)
    stops = torch.tensor(stop_ids, device=device)
    tokens = torch.full((rows, max_new_tokens), pad_token_id, dtype=prompt_ids.dtype, device=device)
    active = torch.arange(rows, device=device)  # the rows still in the batch, in batch order
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    length = 0
    for length in range(1, max_new_tokens + 1):
        out = model(input_ids=inputs, attention_mask=mask, position_ids=position_ids_from(mask)[:, -inputs.shape[1]:],
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache = out.cache
        uniforms = torch.rand(rows, device=device)[active]  # every row's number is drawn, so rows are independent
        drawn = torch.where(finished[active], pad_token_id, sampler(out.logits[:, -1], uniforms))  # (synced only)
        tokens[active, length - 1] = drawn
        finished[active] = finished[active] | torch.isin(drawn, stops)
        if not synced:
            if bool(finished.all()):
                break
            if bool(finished[active].any()):
                keep = (~finished[active]).nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, mask, drawn = active[keep], mask[keep], drawn[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        inputs = drawn.unsqueeze(1)
    return tokens[:, :length]


@contextmanager
def dropout_off(model):
    """Switch dropout off in ``model`` for the block, keeping autograd and gradient checkpointing; restore after.

    Every module in training mode is put in eval mode (``nn.Dropout``, peft's ``lora_dropout``, and the attention
    dropout a module applies when ``self.training``) except the modules with gradient checkpointing on: their
    ``training`` flag is what turns checkpointing (and the KV cache off) on, so the pass keeps the memory and code path
    it had in training mode. Dropout written in such a module's own forward (not in a submodule) would stay on; the
    Llama-family decoder layers have none.
    """
    changed = [m for m in model.modules() if m.training and not getattr(m, "gradient_checkpointing", False)]
    for module in changed:
        module.training = False
    try:
        yield
    finally:
        for module in changed:
            module.training = True


def _scored(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of ``targets`` ``(N, L)`` under ``softmax(logits / temperature)``, logits ``(N, L, V)``."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_logits: int,
                temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities ``(N, num_logits)`` of the last ``num_logits`` tokens of each row given what precedes them,
    under ``softmax(logits / temperature)``.

    Position ids follow the attention mask, so left-padded rows are handled like unpadded ones.
    """
    # only the lm_head rows that predict the last tokens are computed (logits_to_keep)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from(attention_mask),
                   use_cache=False, logits_to_keep=num_logits + 1).logits
    return _scored(logits[:, :-1], input_ids[:, -num_logits:], temperature)  # (N, num_logits)


def length_normalized_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""Per-sequence mean token log-likelihood :math:`\frac{1}{|y|}\log\pi_\theta(y|x)` (Sec. 5.4), shape ``(N,)``.

    >>> length_normalized_logps(torch.tensor([[-1.0, -3.0, -9.0]]), torch.tensor([[1, 1, 0]])).tolist()
    [-2.0]
    """
    mask = mask.to(token_logps.dtype)
    return (token_logps * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def completion_logps(model, completions: Completions, temperature: float = 1.0) -> torch.Tensor:
    """Length-normalized log-likelihoods ``(N,)`` of sampled responses under ``model`` (differentiable).

    Scored as they were sampled (:func:`sample_completions`): at ``temperature`` (pass the sampling one) and with
    dropout off (:func:`dropout_off`); over the full vocabulary, i.e. top-p / top-k truncation is not renormalized.
    The responses go through the model in groups of similar length (:func:`length_groups`), each padded only to its
    own longest response, so one long response does not make every row of the batch pay for its length.
    """
    lengths = completions.completion_mask.sum(dim=1)
    prompt_of_row = torch.arange(len(lengths), device=lengths.device) // completions.group_size
    prompt_tokens = completions.prompt_mask[::completions.group_size].sum(dim=1)
    groups = length_groups(lengths, prompt_of_row, prompt_tokens)
    with dropout_off(model):
        logps = torch.cat([_completion_logps(model, completions, rows, temperature) for rows in groups])
    return logps[torch.cat(groups).argsort()]


def length_groups(lengths: torch.Tensor, prompt_of_row: torch.Tensor, prompt_tokens: torch.Tensor,
                  pass_tokens: int = PASS_OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Rows for the log-prob pass, grouped by response length: the split of the rows sorted by length into runs
    that minimizes the tokens the passes compute, ``sum over groups of rows * longest length + the tokens of the
    group's distinct prompts + pass_tokens`` (dynamic programming over the ``N`` sorted rows, ``O(N^2)``; ties go
    to the longer last group).

    >>> [g.tolist() for g in length_groups(torch.tensor([3, 64, 2, 3]), torch.tensor([0, 0, 1, 1]), torch.tensor([10, 10]))]
    [[2, 0, 3], [1]]
    """
    order = lengths.argsort(stable=True)
    sorted_lengths, prompts = lengths[order].tolist(), prompt_of_row[order].tolist()
    tokens_of = prompt_tokens.tolist()
    best, start_of = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        seen, prompt_cost = set(), 0  # the distinct prompts of rows start..end-1 and their tokens, grown as start falls
        for start in range(end - 1, -1, -1):
            if prompts[start] not in seen:
                seen.add(prompts[start])
                prompt_cost += tokens_of[prompts[start]]
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + pass_tokens + prompt_cost
            if cost <= best[end]:  # on a tie the smallest start, as an ascending search with < would keep
                best[end], start_of[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[start_of[end]:end])
        end = start_of[end]
    return groups[::-1]


def _completion_logps(model, completions: Completions, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`completion_logps` of the responses in ``rows``, padded to the longest of them."""
    group, prompt_length = completions.group_size, completions.prompt_mask.shape[1]
    completion_mask = completions.completion_mask[rows]
    num_logits = int(completion_mask.sum(dim=1).max())
    completion_mask = completion_mask[:, :num_logits]
    sequences = completions.sequences[rows, :prompt_length + num_logits]
    mask = torch.cat([completions.prompt_mask[rows], completion_mask], dim=1)
    shared = None
    if group > 1:
        prompts, prompt_of_row = (rows // group).unique(return_inverse=True)
        shared = prompt_cache(model, completions.sequences[prompts * group, :prompt_length],
                              completions.prompt_mask[prompts * group], prompt_of_row)
    if shared is None:
        logps = token_logps(model, sequences, mask, num_logits, temperature)
        return length_normalized_logps(logps, completion_mask)
    cache, first_logits = shared
    targets = sequences[:, prompt_length:]
    logits = model(input_ids=targets, attention_mask=mask, position_ids=position_ids_from(mask)[:, prompt_length:],
                   cache=cache, use_cache=True, logits_to_keep=num_logits).logits
    logits = torch.cat([first_logits, logits[:, :-1]], dim=1)  # (N, L, V): the logits predicting each token
    return length_normalized_logps(_scored(logits, targets, temperature), completion_mask)


def response_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""Length-normalized NLL :math:`l_\theta(y|x)` of the response tokens (``labels != -100``), shape ``(B,)``.

    This is the per-example objective of Eq. (1)/(3); prompt and padding tokens are masked out. The output layer runs
    only from the first position that predicts a response token on (``logits_to_keep``), not over the prompts.
    """
    mask = labels[:, 1:] != -100
    start = int(mask.any(dim=0).int().argmax())  # position of the earliest logit that predicts a response token
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                   logits_to_keep=input_ids.shape[1] - start).logits
    logits = logits[:, :-1].float()
    targets, mask = labels[:, start + 1:], mask[:, start:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return -length_normalized_logps(-nll, mask)
