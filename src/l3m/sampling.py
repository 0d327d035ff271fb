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
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

NUCLEUS_CANDIDATES = 256  # largest logits searched for the top-p nucleus first (then 16x as many, up to all)


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


def prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
    """Run ``B`` prompts through ``model`` once and repeat each one's KV cache ``group_size`` times.

    Returns ``(cache, logits)``: the cache for ``B*G`` rows and ``(B*G, 1, V)`` logits of the token after each prompt,
    or ``None`` when the model returned no cache (gradient checkpointing in training mode). Differentiable: the
    log-prob pass backpropagates through the shared prompt once per prompt.
    """
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from(prompt_mask),
                use_cache=True, logits_to_keep=1)
    if out.cache is None:
        return None
    out.cache.batch_repeat_interleave(group_size)
    return out.cache, out.logits.repeat_interleave(group_size, dim=0)


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


class NucleusSampler(LogitsProcessor):
    """Draws the next token from :func:`nucleus` of ``softmax(logits / temperature)`` and returns scores that are
    ``-inf`` everywhere but at the drawn token, so that ``generate`` in greedy mode (``do_sample=False``) picks it.

    This keeps ``generate``'s KV cache, stopping and padding while replacing its sampler, which sorts the whole
    vocabulary and draws an exponential for every entry at every step. The draws use torch's global generator, like
    ``generate``'s, but consume it differently: the same seed gives different (equally distributed) samples.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs, ids = nucleus(scores.float() / self.temperature, self.top_p, self.top_k)
        tokens = ids.gather(1, torch.multinomial(probs, num_samples=1))
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


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
) -> Completions:
    """Sample ``num_generations`` responses per prompt with ``model.generate`` (KV cache) and
    :class:`NucleusSampler` (temperature, top-k, top-p).

    The model is put in eval mode while generating (gradient checkpointing is a training-mode feature and
    would disable the KV cache), and its previous mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        cache = None
        if num_generations > 1 and prompt_ids.shape[1] > 1:
            # all of each prompt but its last token, once per prompt; generate() then feeds only the last token
            cache, _ = prompt_cache(model, prompt_ids[:, :-1], prompt_mask[:, :-1], num_generations)
        prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)
        config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                  pad_token_id=pad_token_id, use_cache=True)
        sampler = NucleusSampler(temperature=temperature, top_p=top_p, top_k=top_k)
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, cache=cache,
                                   generation_config=config, logits_processor=LogitsProcessorList([sampler]))
    finally:
        model.train(was_training)
    completion = sequences[:, prompt_ids.shape[1]:]
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device))
    has_stop = is_stop.any(dim=1)
    # index of the first stop token, or L when there is none
    first_stop = torch.where(has_stop, is_stop.int().argmax(dim=1), torch.full_like(has_stop, completion.shape[1],
                                                                                       dtype=torch.long))
    positions = torch.arange(completion.shape[1], device=completion.device).unsqueeze(0)
    completion_mask = (positions <= first_stop.unsqueeze(1)).long()
    completion_ids = [row[: int(n)].tolist() for row, n in zip(completion, first_stop)]
    return Completions(sequences, prompt_mask, completion_mask, completion_ids, ~has_stop, num_generations)


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
    """
    with dropout_off(model):
        return _completion_logps(model, completions, temperature)


def _completion_logps(model, completions: Completions, temperature: float) -> torch.Tensor:
    num_logits = completions.completion_mask.shape[1]
    group, prompt_length = completions.group_size, completions.prompt_mask.shape[1]
    shared = prompt_cache(model, completions.sequences[::group, :prompt_length], completions.prompt_mask[::group],
                          group) if group > 1 else None
    if shared is None:
        logps = token_logps(model, completions.sequences, completions.attention_mask, num_logits, temperature)
        return length_normalized_logps(logps, completions.completion_mask)
    cache, first_logits = shared
    mask = completions.attention_mask
    targets = completions.sequences[:, prompt_length:]
    logits = model(input_ids=targets, attention_mask=mask, position_ids=position_ids_from(mask)[:, prompt_length:],
                   cache=cache, use_cache=True, logits_to_keep=num_logits).logits
    logits = torch.cat([first_logits, logits[:, :-1]], dim=1)  # (N, L, V): the logits predicting each token
    return length_normalized_logps(_scored(logits, targets, temperature), completions.completion_mask)


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
