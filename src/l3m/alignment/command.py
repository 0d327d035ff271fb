"""``l3m align``: CAID (:func:`l3m.alignment.caid.run_caid`) from a YAML config, as ``l3m grpo`` runs GRPO.

The config holds the data fields (:class:`l3m.ScriptArguments`: prompts in a ``prompt`` or ``messages`` column),
:class:`l3m.alignment.CAIDConfig`'s (DPO's, ``beta``, ``reward``, ``constraints``, ``outer_iterations``, ...) and the
model's (``model_name_or_path``, ``use_peft`` and the LoRA fields)::

    model_name_or_path: demo
    dataset_name: demo
    output_dir: outputs/caid
    reward: length_words
    constraints: [{name: short, reward: length_tokens, max: 40}]
    beta: 0.1
    outer_iterations: 3
"""

from __future__ import annotations

from l3m.alignment.config import CAIDConfig
from l3m.alignment.samples import check_prompts

DESCRIPTION = ("CAID: maximize a reward minus beta KL to the initial model under reward constraints; a one-shot dual "
               "warm start, then DPO policy steps and dual steps (docs/alignment.md).")


def align(script_args, args: CAIDConfig, model_args) -> list[dict]:
    """Load the data and the model the configs name and run CAID on the training prompts; returns the records."""
    from trl import get_peft_config

    from l3m.alignment.caid import run_caid
    from l3m.loading import load_model_and_tokenizer, load_splits

    splits = load_splits(script_args, args.seed, check=check_prompts)
    model_args.trust_remote_code = args.trust_remote_code  # DPOConfig's field, read by the loader
    model, tokenizer = load_model_and_tokenizer(model_args)
    return run_caid(model, tokenizer, splits["train"], args, peft_config=get_peft_config(model_args))


def align_command(argv: list[str]) -> int:
    """``l3m align``: parse ``argv``, run CAID, print one line per iterate."""
    from l3m.config import ScriptArguments, TrainerModelConfig
    from l3m.parsing import parse_command

    script_args, args, model_args = parse_command((ScriptArguments, CAIDConfig, TrainerModelConfig), argv,
                                                  "l3m align", DESCRIPTION)
    records = align(script_args, args, model_args)
    for record in records:
        print(format_record(record))
    print(f"Wrote {args.output_dir}/iterations.jsonl")
    return 0


def format_record(record: dict) -> str:
    """One line: the iterate, the multipliers it was trained for, objective and KL (± s.e.), each constraint's slack
    and whether it is met, the next multipliers."""
    def pm(stat: dict) -> str:
        return f"{stat['mean']:.4g} ± {stat['se']:.2g}"

    lam = record["multipliers"]
    parts = [f"iteration {record['iteration']}", "pi_ref" if lam is None else
             "lambda " + ", ".join(f"{v:.4g}" for v in lam.values()),
             f"objective {pm(record['objective'])}", f"KL {pm(record['kl'])}"]
    parts += [f"{name} slack {pm(c['slack'])} {'met' if c['met'] else 'violated'}"
              for name, c in record["constraints"].items()]
    parts.append("next lambda " + ", ".join(f"{v:.4g}" for v in record["next_multipliers"].values()))
    return " | ".join(parts)
