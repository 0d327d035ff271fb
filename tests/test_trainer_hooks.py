"""What L3MTrainer relies on in transformers' Trainer, pinned so that an upgrade that changes it fails here, saying
what changed, instead of silently breaking atomic checkpoints or gradient accumulation."""

from __future__ import annotations

import torch

from fixtures.tiny import make_examples
from fixtures.trainers import Recorder, make_trainer


def test_gradient_accumulation_makes_the_update_of_the_whole_batch(tmp_path):
    """Two accumulated micro-batches of 4 make the same optimizer step as one batch of the same 8 examples: l3m's
    loss is a micro-batch mean and the Trainer divides it by the accumulation steps (model_accepts_loss_kwargs).

    Plain SGD without weight decay or clipping, so that the update is the gradient times the learning rate: a loss
    the Trainer did not divide would move the weights twice as far (a relative difference of 1), which clipping or
    Adam's normalization would hide."""
    examples = make_examples(8, 8, 12, seed=0)  # one epoch, one optimizer step in both runs
    updates, seen = {}, {}
    for accumulation, batch in ((2, 4), (1, 8)):
        trainer = make_trainer(tmp_path / str(accumulation), examples=examples, max_steps=1,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               optim="sgd", weight_decay=0.0, learning_rate=0.1, lr_scheduler_type="constant",
                               max_grad_norm=0.0)
        seen[accumulation] = micro_batches = []
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):
            micro_batches.append([ids[mask.bool()].tolist() for ids, mask in
                                  zip(inputs["input_ids"], inputs["attention_mask"])])
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording_compute_loss
        recorder = Recorder(trainer.model)
        trainer.add_callback(recorder)
        trainer.train()
        assert trainer.state.global_step == 1
        before, after = recorder.weights[0], recorder.weights[1]
        updates[accumulation] = torch.cat([(after[k] - before[k]).flatten() for k in before])

    assert [len(b) for b in seen[2]] == [4, 4] and [len(b) for b in seen[1]] == [8]
    assert seen[2][0] + seen[2][1] == seen[1][0], "both runs must see the same examples in the same order"
    assert updates[1].norm() > 0
    difference = ((updates[2] - updates[1]).norm() / updates[1].norm()).item()
    assert difference < 1e-5, f"accumulated and whole-batch updates differ by {difference:.2g} (relative)"
