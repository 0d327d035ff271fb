r"""Learned reward models as constraint rewards (App. A.1 of the L3M paper).

Two kinds, both scored on ``(prompt, response)`` text, so a reward model may use another tokenizer than the policy:
the policy's responses are decoded to text and re-encoded with the reward model's tokenizer.

- ``lm``: a causal LM whose reward is the length-normalized log-likelihood of the response given the prompt,
  :math:`r_\phi(y|x) = \frac{1}{|y|}\log p_\phi(y|x)`, the end-of-turn token included (App. A.1). ``l3m reward
  train`` fine-tunes one with the Bradley-Terry loss.
- ``seqcls``: an ``AutoModelForSequenceClassification`` with one logit (the format of most public reward models);
  the reward is that logit.

In YAML a constraint names one with a mapping: ``reward: {type: lm, path: outputs/rm_helpful}``. ``type`` may be
left out for a folder saved by ``l3m reward train`` (its ``l3m_reward.json`` says) or one whose config names a
``...ForSequenceClassification`` or ``...ForCausalLM`` architecture. Reward models are loaded on first use, run in
eval mode without gradients, in batches, on the device the trainer moves them to (the policy's), and are never
trained during fine-tuning.

Shapes: N responses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import torch

from l3m.errors import L3MConfigError
from l3m.offline import prepare_hub_name

REWARD_MODEL_TYPES = ("lm", "seqcls")
REWARD_INFO_NAME = "l3m_reward.json"
_SPEC_KEYS = {"type", "path", "batch_size"}
_ARCHITECTURE_SUFFIXES = {"lm": "ForCausalLM", "seqcls": "ForSequenceClassification"}


def sequence_rewards(model, reward_type: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards ``(N,)`` of a collated batch (:class:`l3m.data.CompletionCollator`) of prompt + response sequences.

    ``lm``: minus the length-normalized NLL of the response tokens (``labels != -100``); ``seqcls``: the single
    logit. Differentiable: :class:`l3m.rewards.training.RewardModelTrainer` trains through this same function.
    """
    from l3m.sampling import response_nll

    if reward_type == "lm":
        return -response_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return logits[:, 0].float()


def encode_responses(tokenizer, prompts: Iterable[str], responses: Iterable[str]) -> list[dict[str, list[int]]]:
    """Token ids of each ``(prompt, response)`` under the reward model's tokenizer; the response ends with EOS."""
    from l3m.data import tokenize_example

    features = []
    for prompt, response in zip(prompts, responses):
        prompt_ids, completion_ids = tokenize_example(prompt, response, tokenizer)
        features.append({"prompt_ids": prompt_ids, "completion_ids": completion_ids})
    return features


def read_reward_info(path: str) -> dict[str, Any] | None:
    """The ``l3m_reward.json`` of a saved reward model folder, or None when it has none."""
    info_path = os.path.join(path, REWARD_INFO_NAME)
    if not os.path.isfile(info_path):
        return None
    with open(info_path, encoding="utf-8") as f:
        return json.load(f)


class ModelReward:
    """A reward model as a reward function with TRL's signature ``f(prompts, completions, completion_ids, **kw)``.

    Args:
        path: a local folder or a hub id.
        type: ``"lm"`` or ``"seqcls"``; inferred from ``l3m_reward.json`` or the config's architecture when None.
        batch_size: responses scored per forward pass.
        field: names the config field in error messages.
    """

    def __init__(self, path: str, type: str | None = None, batch_size: int = 16, field: str = "reward"):
        self.field = field
        if not isinstance(path, str) or not path:
            raise L3MConfigError(f"{field}.path: expected a folder or hub id of a reward model, got {path!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise L3MConfigError(f"{field}.batch_size: must be an integer >= 1, got {batch_size!r}")
        if type is not None and type not in REWARD_MODEL_TYPES:
            raise L3MConfigError(f"{field}.type: must be one of {', '.join(REWARD_MODEL_TYPES)}, got {type!r}")
        self.path = path
        self.batch_size = batch_size
        self.type = self._check(path, type)
        self.__name__ = os.path.basename(os.path.normpath(path))  # the constraint's default name
        self.device = torch.device("cpu")
        self.model = None
        self.tokenizer = None

    def _check(self, path: str, type: str | None) -> str:
        """Validate the reference from the config alone (no weights loaded) and return the reward type."""
        from transformers import AutoConfig

        field = self.field
        if not os.path.isdir(path):
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(path)
            except HFValidationError:
                raise L3MConfigError(f"{field}.path: no such folder {path!r}") from None
            prepare_hub_name(path)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            what = ("is not a model folder" if os.path.isdir(path)
                    else "is no local folder and cannot be loaded from the hub")
            raise L3MConfigError(f"{field}.path: {path!r} {what} ({str(err).splitlines()[0]})") from err
        info = read_reward_info(path) if os.path.isdir(path) else None
        if info is not None:
            if type is not None and type != info.get("type"):
                raise L3MConfigError(f"{field}.type: {path} was trained as a {info.get('type')!r} reward model "
                                     f"(its {REWARD_INFO_NAME}), not {type!r}; drop 'type' or fix it")
            type = info.get("type")
        architectures = list(getattr(config, "architectures", None) or [])
        if type is None:
            type = next((t for t, suffix in _ARCHITECTURE_SUFFIXES.items()
                         if any(a.endswith(suffix) for a in architectures)), None)
            if type is None:
                raise L3MConfigError(f"{field}.type: cannot tell the reward type of {path} (architectures "
                                     f"{architectures}); give type: lm or type: seqcls")
        suffix = _ARCHITECTURE_SUFFIXES[type]
        if architectures and not any(a.endswith(suffix) for a in architectures):
            hint = ("use type: lm to score with its log-likelihood" if type == "seqcls"
                    else "use type: seqcls for a classification reward model")
            raise L3MConfigError(f"{field}.path: {path} has no {suffix} head (architectures {architectures}); {hint}")
        if type == "seqcls" and config.num_labels != 1:
            raise L3MConfigError(f"{field}.path: {path} has {config.num_labels} output logits; a sequence-"
                                 "classification reward model must have exactly one (num_labels=1)")
        return type

    def load(self) -> None:
        """Load the model and tokenizer (once) on ``self.device``, in eval mode with gradients off."""
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

        auto = AutoModelForCausalLM if self.type == "lm" else AutoModelForSequenceClassification
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
            model = auto.from_pretrained(self.path, dtype=torch.float32)
        except OSError as err:
            raise L3MConfigError(f"{self.field}.path: cannot load {self.path!r} ({str(err).splitlines()[0]})") from err
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.type == "seqcls" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # it finds each row's last token by the pad id
        model.requires_grad_(False)
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer

    def to(self, device: torch.device | str) -> ModelReward:
        """Run on ``device`` (the policy's); moves the model if it is loaded already."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], completion_ids=None, **kwargs) -> list[float]:
        from l3m.data import CompletionCollator

        self.load()
        self.model.eval()
        features = encode_responses(self.tokenizer, prompts, completions)
        collate = CompletionCollator(self.tokenizer.pad_token_id)
        rewards: list[float] = []
        for start in range(0, len(features), self.batch_size):
            batch = collate(features[start:start + self.batch_size])
            batch = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}
            rewards += sequence_rewards(self.model, self.type, batch).tolist()
        return rewards

    def __repr__(self) -> str:
        return f"ModelReward(type={self.type!r}, path={self.path!r})"


def reward_model_from_spec(spec: dict[str, Any], field: str = "reward") -> ModelReward:
    """Build a :class:`ModelReward` from a YAML mapping ``{type: lm|seqcls, path: ..., batch_size: 16}``."""
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise L3MConfigError(f"{field}: unknown key(s) {sorted(unknown)} of a reward model; allowed: "
                             f"{sorted(_SPEC_KEYS)} (e.g. {{type: lm, path: outputs/rm}})")
    if "path" not in spec:
        raise L3MConfigError(f"{field}: a reward model needs a 'path' (e.g. {{type: lm, path: outputs/rm}})")
    return ModelReward(spec["path"], spec.get("type"), spec.get("batch_size", 16), field=field)


def place_reward_models(reward_funcs: Iterable, device: torch.device | str) -> None:
    """Move the reward models among ``reward_funcs`` to ``device``; other reward functions are left alone."""
    for func in reward_funcs:
        if isinstance(func, ModelReward):
            func.to(device)
