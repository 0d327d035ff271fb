"""Decoding with packed linear weights: the same logits and responses as the default product, the packed copies are
what the layers use inside the block, every layer is itself again after it, and nothing is packed under autocast."""

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
    """A change of the weights inside the block does not reach the output (what the docstring warns about), and
    reaches it again after the block: the packed path is the one that ran."""
    model, ids = _model_and_input()
    plain = model(ids).logits
    with packed_linears(model):
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # (lm_head shares the embedding: not that one)
        assert torch.allclose(model(ids).logits, plain, atol=1e-5)
    assert not torch.allclose(model(ids).logits, plain, atol=1e-3)


@torch.no_grad()
def test_nothing_is_packed_under_cpu_autocast_or_where_a_forward_was_already_replaced():
    model, ids = _model_and_input()
    with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model) as packed:
        assert packed == 0
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
