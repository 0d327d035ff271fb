"""Decoding with packed linear weights: the same logits and responses as the default product, the packed copies are
what the layers use inside the block, every layer is itself again after it, and under bf16 autocast the bf16 packed
copies give autocast's own logits."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fixtures.tiny import build_model, build_tokenizer
from l3m.packed_linear import packed_linears, packing_available
from l3m.sampling import sample_completions

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear reorder")


def _model_and_input():
    tokenizer = build_tokenizer()
    model = build_model(tokenizer).eval()
    return model, torch.randint(3, len(tokenizer), (4, 7), generator=torch.Generator().manual_seed(0))


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def test_packed_layers_give_the_default_logits_and_are_themselves_again_after_the_block():
    model, ids = _model_and_input()
    plain = model(ids).logits
    with packed_linears(model) as packed:
        assert packed == len(_linears(model)) > 0
        assert torch.allclose(model(ids).logits, plain, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(model(ids).logits, plain)


@torch.no_grad()
def test_inside_the_block_the_layers_use_their_packed_copies():
    """A change of the weights after the layers' first call inside the block does not reach the output (what the
    docstring warns about), and reaches it again after the block: the packed path is the one that ran."""
    model, ids = _model_and_input()
    plain = model(ids).logits
    with packed_linears(model):
        model(ids)  # each layer packs its copy at its first call
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # (lm_head shares the embedding: not that one)
        assert torch.allclose(model(ids).logits, plain, atol=1e-5)
    assert not torch.allclose(model(ids).logits, plain, atol=1e-3)


@torch.no_grad()
def test_under_bf16_autocast_the_packed_bf16_copies_give_autocasts_logits_bit_for_bit():
    """The model's forward under CPU bf16 autocast (as accelerate runs it with ``bf16: true``): the layers multiply
    with bf16 copies packed inside the block, and the logits are exactly autocast's own."""
    model, ids = _model_and_input()
    model.model.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.randn(model.config.hidden_size))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(ids).logits
    with packed_linears(model) as packed:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = model(ids).logits
        forwards = [vars(m)["forward"] for m in _linears(model)]
    assert packed == len(_linears(model))
    assert all(set(f.packed) == {torch.bfloat16} for f in forwards)  # what ran is the bf16 packed copy, only it
    assert torch.equal(inside, plain)


@torch.no_grad()
def test_other_autocast_dtypes_run_the_layers_as_they_are():
    model, ids = _model_and_input()
    with torch.autocast("cpu", dtype=torch.float16):
        plain = model(ids).logits
    with packed_linears(model):
        with torch.autocast("cpu", dtype=torch.float16):
            inside = model(ids).logits
        assert not any(vars(m)["forward"].packed for m in _linears(model))
    assert torch.equal(inside, plain)


@torch.no_grad()
def test_a_forward_already_replaced_is_left_alone():
    model, ids = _model_and_input()
    hooked = model.lm_head
    hooked.forward = torch.nn.Linear.forward.__get__(hooked)  # as accelerate's hooks replace a module's forward
    with packed_linears(model) as packed:
        assert packed == len(_linears(model)) - 1
        assert vars(hooked)["forward"].__func__ is torch.nn.Linear.forward
    assert "forward" in vars(hooked)


def test_sampling_with_packed_weights_draws_the_responses_of_the_default_product(monkeypatch):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer(["please say w1 w2 w3 w4 w5", "count w7", "say w9 w10 w11"], return_tensors="pt", padding=True)
    runs = []
    for packing in (True, False):
        if not packing:
            monkeypatch.setattr("l3m.sampling.packed_linears", lambda model: contextlib.nullcontext(0))
        torch.manual_seed(3)
        runs.append(sample_completions(model, batch["input_ids"], batch["attention_mask"], [tokenizer.eos_token_id],
                                       tokenizer.pad_token_id, num_generations=4, max_new_tokens=8, top_p=0.9))
    packed, default = runs
    assert len({len(ids) for ids in packed.completion_ids}) > 1
    assert packed.completion_ids == default.completion_ids


def test_a_bf16_trainers_constraint_step_samples_with_the_bf16_packed_copies(tmp_path, monkeypatch):
    """With ``bf16: true`` accelerate runs the forward under autocast: the constraint step's sampling multiplies with
    bf16 packed copies (not the float32 ones, not autocast's per-call casts), and the step updates the weights."""
    from fixtures.trainers import copy_weights, make_trainer, same_weights
    from l3m import Constraint
    from l3m.packed_linear import _PackedForward

    packed_dtypes = []
    original = _PackedForward._weights
    monkeypatch.setattr(_PackedForward, "_weights", lambda self, dtype: packed_dtypes.append(dtype) or
                        original(self, dtype))
    trainer = make_trainer(tmp_path, [Constraint("length_tokens", max=3, name="length")], max_steps=1,
                           objective_step_probability=0.0, max_completion_length=6, bf16=True)
    before = copy_weights(trainer.model)
    trainer.train()
    assert packed_dtypes and set(packed_dtypes) == {torch.bfloat16}
    assert not same_weights(before, copy_weights(trainer.model))
