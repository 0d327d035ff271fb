"""Configuration of :func:`l3m.alignment.caid.run_caid`: TRL's ``DPOConfig`` (the policy step and the KL weight
``beta``) plus the objective, the constraints, sampling and the dual step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import yaml
from trl import DPOConfig

from l3m.constraints import parse_constraints
from l3m.errors import L3MConfigError


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise L3MConfigError(f"{name}: {message}")


def _yaml(value, name: str):
    """A structure given as a YAML/JSON string on the command line, parsed; anything else as it is."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise L3MConfigError(f"{name}: not valid YAML/JSON ({err})") from err
    return value


PAIR_SOURCES = ("reference", "latest")  # whose responses a policy step pairs up: pi_ref's, or the latest policy's


@dataclass
class CAIDConfig(DPOConfig):
    r"""``trl.DPOConfig`` plus the fields of the iterative dual loop (CAID).

    The problem: maximize :math:`\mathbb{E}[r] - \beta\,\mathrm{KL}(\pi\|\pi_\mathrm{ref})` subject to each
    constraint of ``constraints`` (l3m's constraint records, any kind: ``E[r_i] >= min``, ``<= max``, chance,
    uniform). ``beta`` is DPO's and the problem's. DPO's own fields (``learning_rate``, ``num_train_epochs`` or
    ``max_steps``, batch sizes, ...) set every policy step; each step trains from :math:`\pi_\mathrm{ref}` and writes
    under ``output_dir/iteration-<t>/``.
    """

    reward: str | None = field(
        default=None,
        metadata={"help": "The objective r to maximize, as a constraint's reward is written: a built-in "
                          "(length_tokens, ...), 'module:function', or a reward-model mapping {type: lm|seqcls, "
                          "path: ...}."},
    )
    constraints: list[dict] | str | None = field(
        default=None,
        metadata={"help": "Constraint records, e.g. [{name: safe, reward: 'mymod:safety', min: 0.5}]: E[g_i] >= b_i "
                          "(any l3m constraint kind; a range is two; margin and confidence set a satisfaction target "
                          "for the dual steps). On the command line: a YAML/JSON string."},
    )
    outer_iterations: int = field(
        default=3,
        metadata={"help": "K: outer iterations after the one-shot warm start, each a DPO policy step at fixed lambda, "
                          "fresh samples, one dual step (the paper runs 3-4)."},
    )
    num_generations: int = field(
        default=8,
        metadata={"help": "Responses sampled per training prompt in every pass (the one-shot dual's samples of "
                          "pi_ref included); they are paired off for DPO, num_generations // 2 pairs per prompt."},
    )
    max_completion_length: int = field(default=64, metadata={"help": "Largest number of tokens sampled per response."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (1: draws of the policy)."})
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling. 1 draws from the policy itself, as the dual's estimates assume; the paper "
                          "samples with 0.9."},
    )
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    dual_lr: float = field(
        default=0.1,
        metadata={"help": "eta of the dual step lambda <- max(0, lambda - eta (E[g] - b)), in multiplier units per "
                          "unit of slack."},
    )
    multiplier_max: float = field(
        default=100.0,
        metadata={"help": "Cap on every multiplier. The one-shot dual is unbounded when the samples of pi_ref cannot "
                          "meet a constraint; lambda then stops at the cap (reported as at_cap)."},
    )
    pairs_from: str = field(
        default="reference",
        metadata={"help": "Whose responses every policy step pairs up for DPO: 'reference' (pi_ref's pass, relabelled "
                          "at each iteration's lambda: the pairs a DPO from pi_ref with reference pi_ref fits best) or "
                          "'latest' (the previous policy's pass). Dual steps always use the latest policy's pass."},
    )
    deterministic_pairs: bool = field(
        default=False,
        metadata={"help": "Prefer the higher-scoring response of each pair always, instead of with Bradley-Terry "
                          "probability sigmoid((s1 - s2) / beta); DPO then no longer targets pi_lambda."},
    )

    def __post_init__(self):
        self.reward = _yaml(self.reward, "reward")
        self.constraints = _yaml(self.constraints, "constraints")
        _check(self.reward is not None, "reward", "required: the objective to maximize (e.g. reward: "
                                                  "length_tokens, 'module:function' or {type: seqcls, path: ...})")
        self.parsed_constraints = parse_constraints(self.constraints)
        _check(bool(self.parsed_constraints), "constraints", "required: at least one constraint record, e.g. "
                                                             "[{reward: length_tokens, max: 40}]")
        _check(isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0, "beta",
               f"must be > 0 (the KL weight of the problem and of DPO), got {self.beta}")
        _check(self.outer_iterations >= 0, "outer_iterations", f"must be >= 0, got {self.outer_iterations}")
        _check(self.num_generations >= 2, "num_generations", f"must be >= 2 (pairs), got {self.num_generations}")
        _check(self.max_completion_length >= 1, "max_completion_length",
               f"must be >= 1, got {self.max_completion_length}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.generation_batch_size >= 1, "generation_batch_size",
               f"must be >= 1, got {self.generation_batch_size}")
        _check(self.pairs_from in PAIR_SOURCES, "pairs_from",
               f"must be 'reference' or 'latest', got {self.pairs_from!r}")
        _check(self.dual_lr >= 0, "dual_lr", f"must be >= 0, got {self.dual_lr}")
        _check(self.multiplier_max > 0, "multiplier_max", f"must be > 0, got {self.multiplier_max}")
        loss = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        _check(loss == ["sigmoid"], "loss_type", f"must be 'sigmoid' (the DPO loss whose optimum is pi_lambda), got "
                                                 f"{self.loss_type}")
        super().__post_init__()

    def policy_step_config(self, output_dir: str) -> DPOConfig:
        """The ``DPOConfig`` of one policy step: this config's DPO fields, writing to ``output_dir``."""
        values = {f.name: getattr(self, f.name) for f in fields(DPOConfig) if f.init}
        return DPOConfig(**{**values, "output_dir": output_dir})
