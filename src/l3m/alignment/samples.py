r"""One sampling pass of CAID: N responses to every training prompt, scored by the objective and the constraints.

A pass gives what the loop needs: the objective :math:`r`, each one-sided constraint's per-sample slack
:math:`g_i - b_i` (:math:`-c_i`, :meth:`l3m.constraints.Bound.values`: ``r - b`` for ``expectation``,
``1{r >= b} - (1 - epsilon)`` for ``chance``, ``delta - max(0, b - r)`` for ``uniform``; the mean is
:math:`\ge 0` when the constraint is met), and the per-sample log-ratio :math:`\log\pi(y|x) - \log\pi_\mathrm{ref}(y|x)`
whose mean estimates :math:`\mathrm{KL}(\pi\|\pi_\mathrm{ref})` (biased when ``top_p < 1`` or ``temperature != 1``:
the responses are then not draws of :math:`\pi`). Passes are saved as JSONL so a resumed run can rebuild its pairs.

Shapes: M prompts, N responses per prompt, K one-sided constraints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from l3m.confidence import training_estimate
from l3m.constraints import Bound, Constraint, compute_rewards, violations
from l3m.data import left_pad
from l3m.errors import L3MConfigError, L3MDataError
from l3m.files import write_jsonl
from l3m.sampling import Completions, eos_ids, sample_completions


@dataclass
class Prompts:
    """The training prompts: ``raw[i]`` as TRL's preference data takes it (a conversation, or a text), ``texts[i]``
    as the policy and the rewards see it (a conversation with the chat template and the generation prompt applied),
    ``ids[i]`` its tokens (special tokens added to a text prompt, as TRL's DPO tokenizes it; a rendered chat
    template has its own)."""

    raw: list
    texts: list[str]
    ids: list[list[int]]


def check_prompts(dataset, name: str = "train", field: str = "train_dataset") -> None:
    """Fail early, naming ``field``, when a split is empty or has neither ``prompt`` nor ``messages``."""
    columns = set(dataset.column_names)
    if len(dataset) == 0 or not columns & {"prompt", "messages"}:
        raise L3MDataError(f"{field}: the {name} split has {len(dataset)} rows with columns {sorted(columns)}; "
                           "expected prompts in a 'prompt' or 'messages' column")


def render_prompts(dataset, tokenizer) -> Prompts:
    """The :class:`Prompts` of ``dataset``: a ``prompt`` column (text or conversation) as it is, or ``messages``
    conversations cut after their last user turn."""
    check_prompts(dataset)
    columns = set(dataset.column_names)
    raw = []
    for i, example in enumerate(dataset):
        prompt = example["prompt"] if "prompt" in columns else example["messages"]
        if "prompt" not in columns:
            users = [j for j, m in enumerate(prompt or []) if isinstance(m, dict) and m.get("role") == "user"]
            if not users:
                raise L3MDataError(f"train_dataset: messages of example {i} have no user turn to answer")
            prompt = prompt[: users[-1] + 1]
        if not isinstance(prompt, (str, list)) or not prompt:
            raise L3MDataError(f"train_dataset: example {i} has no prompt (a text or a list of messages)")
        raw.append(prompt)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list)
             else p for p in raw]
    ids = [tokenizer(t, add_special_tokens=isinstance(p, str))["input_ids"] for p, t in zip(raw, texts)]
    return Prompts(raw, texts, ids)


@dataclass
class Samples:
    """A scored sampling pass: ``responses[i][j]`` the text of response *j* to prompt *i*; ``objective`` (M, N);
    ``rewards`` {constraint name: (M, N)}; ``slack`` (M, N, K); ``log_ratio`` (M, N); ``truncated`` (M, N) True where
    no end-of-turn token came within the length limit. Tensors are float64 (``truncated`` bool)."""

    responses: list[list[str]]
    objective: torch.Tensor
    rewards: dict[str, torch.Tensor]
    slack: torch.Tensor
    log_ratio: torch.Tensor
    truncated: torch.Tensor

    def save(self, path: str) -> str:
        """One JSON record per prompt, atomically."""
        return write_jsonl(path, ({"responses": self.responses[i], "objective": self.objective[i].tolist(),
                                   "rewards": {k: v[i].tolist() for k, v in self.rewards.items()},
                                   "slack": self.slack[i].tolist(), "log_ratio": self.log_ratio[i].tolist(),
                                   "truncated": self.truncated[i].tolist()} for i in range(len(self.responses))))

    def with_bounds(self, bounds: Sequence[Bound]) -> Samples:
        """The same responses and rewards, their slack taken against ``bounds`` (other thresholds on the constraints
        these samples were scored for): one pass of pi_ref serves several problems that differ only in thresholds."""
        missing = sorted({bound.constraint.name for bound in bounds} - set(self.rewards))
        if missing:
            raise L3MConfigError(f"reference_samples: no rewards of constraint(s) {missing}; they were scored for "
                                 f"{sorted(self.rewards)}")
        m, n = self.objective.shape
        flat = {name: values.reshape(-1) for name, values in self.rewards.items()}
        return replace(self, slack=-violations(bounds, flat).double().reshape(m, n, len(bounds)))

    def training_slack(self, bounds: Sequence[Bound]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, N, K)`` per-sample slack against the training targets, and the ``(K,)`` confidence terms in it.

        Each bound's target is moved inward by its constraint's ``margin`` and, with a ``confidence``, by ``z`` times
        this pass's standard error (over prompt means, as :func:`mean_and_se`; at most
        :attr:`l3m.constraints.Bound.confidence_room`), as l3m's trainer tightens a step's estimate
        (:func:`l3m.confidence.training_estimate`). The dual math of CAID takes this slack; records and evaluation
        judge ``slack`` (against the bounds themselves). Without margin or confidence the two are equal."""
        m, n = self.objective.shape
        flat = {name: values.reshape(-1) for name, values in self.rewards.items()}
        values = violations(bounds, flat, target=True).double().reshape(m, n, len(bounds))
        _, terms = training_estimate(bounds, values.mean(dim=1))
        return -(values + terms), terms

    @classmethod
    def load(cls, path: str) -> Samples:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        f64 = dict(dtype=torch.float64)
        return cls([row["responses"] for row in rows], torch.tensor([row["objective"] for row in rows], **f64),
                   {k: torch.tensor([row["rewards"][k] for row in rows], **f64) for k in rows[0]["rewards"]},
                   torch.tensor([row["slack"] for row in rows], **f64),
                   torch.tensor([row["log_ratio"] for row in rows], **f64),
                   torch.tensor([row["truncated"] for row in rows], dtype=torch.bool))


def score_objective(func: Callable, prompts: list[str], completions: list[str],
                    completion_ids: list[list[int]]) -> torch.Tensor:
    """``(N,)`` objective rewards, called as every l3m reward is (:func:`l3m.constraints.compute_rewards`); a wrong
    count, a non-number or a non-finite value is an :class:`L3MConfigError` naming ``reward``."""
    values = func(prompts=prompts, completions=completions, completion_ids=completion_ids)
    if values is None or not hasattr(values, "__len__") or len(values) != len(completions):
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise L3MConfigError(f"reward: the reward function returned {got}; expected a list of {len(completions)} "
                             "numbers")
    try:
        scores = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise L3MConfigError(f"reward: the reward function returned a non-number ({err})") from err
    if not torch.isfinite(scores).all():
        raise L3MConfigError("reward: the reward function returned NaN or inf")
    return scores


def sample_and_score(model, tokenizer, prompts: Prompts, objective: Callable, constraints: Sequence[Constraint],
                     bounds: Sequence[Bound], settings, log_ratio: Callable[[Completions], torch.Tensor] | None = None,
                     description: str = "Sampling") -> Samples:
    r"""Sample ``settings.num_generations`` responses to each prompt from ``model`` and score them.

    ``settings`` is a :class:`l3m.alignment.config.CAIDConfig` (``generation_batch_size`` prompts go through one
    ``generate``; length, temperature and top-p). ``log_ratio`` gives the ``(B*N,)`` per-sample
    :math:`\log\pi(y|x) - \log\pi_\mathrm{ref}(y|x)` of a batch; ``None`` means ``model`` is the reference.
    """
    n = settings.num_generations
    device = next(model.parameters()).device
    stop_ids = eos_ids(tokenizer, model)
    parts = []
    batches = range(0, len(prompts.ids), settings.generation_batch_size)
    for start in tqdm(batches, desc=description, disable=settings.disable_tqdm, leave=False):
        rows = slice(start, start + settings.generation_batch_size)
        ids, mask = left_pad(prompts.ids[rows], tokenizer.pad_token_id)
        completions = sample_completions(model, ids.to(device), mask.to(device), stop_ids, tokenizer.pad_token_id,
                                         num_generations=n, max_new_tokens=settings.max_completion_length,
                                         temperature=settings.temperature, top_p=settings.top_p)
        responses = tokenizer.batch_decode(completions.completion_ids, skip_special_tokens=True)
        repeated = [t for t in prompts.texts[rows] for _ in range(n)]
        rewards = compute_rewards(constraints, repeated, responses, completions.completion_ids)
        parts.append((responses, score_objective(objective, repeated, responses, completions.completion_ids),
                      {k: v.double() for k, v in rewards.items()}, -violations(bounds, rewards).double(),
                      torch.zeros(len(responses), dtype=torch.float64) if log_ratio is None
                      else log_ratio(completions).double().cpu(), completions.truncated.cpu()))
    responses = [r for part in parts for r in part[0]]
    m = len(prompts.ids)
    return Samples([responses[i * n:(i + 1) * n] for i in range(m)],
                   torch.cat([p[1] for p in parts]).reshape(m, n),
                   {c.name: torch.cat([p[2][c.name] for p in parts]).reshape(m, n) for c in constraints},
                   torch.cat([p[3] for p in parts]).reshape(m, n, len(bounds)),
                   torch.cat([p[4] for p in parts]).reshape(m, n),
                   torch.cat([p[5] for p in parts]).reshape(m, n))


def mean_and_se(values: torch.Tensor) -> dict[str, float]:
    """Mean of ``(M, N)`` per-sample values over prompts and responses, and its standard error over the M prompt
    means (responses to one prompt are not independent draws of E_x)."""
    per_prompt = values.double().mean(dim=1)
    se = per_prompt.std().item() / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else math.nan
    return {"mean": per_prompt.mean().item(), "se": se}
