"""`tuner.training.windows` and `summed_loss`, the helpers of the README's loop: windows cut the
samples into the plan's micro-batches (the epoch's short end kept), and the summed loss over its
count is exactly the mean loss transformers computes."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tuner.training import summed_loss, windows


def test_windows_follow_the_plans_sizes_and_keep_the_short_end() -> None:
    samples = [{"x": torch.tensor([float(i)])} for i in range(11)]
    got = [[len(piece["x"]) for piece in window] for window in windows(samples, [3, 2])]
    assert got == [[3, 2], [3, 2], [1]]
    firsts = [window[0]["x"][0].item() for window in windows(samples, [3, 2])]
    assert firsts == [0.0, 5.0, 10.0]  # in order, nothing dropped or repeated
    with pytest.raises(ValueError, match="positive"):
        list(windows(samples, [0]))


def test_summed_loss_over_its_count_is_the_transformers_loss() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50)).eval()
    input_ids = torch.randint(0, 50, (3, 16))
    mask = torch.ones_like(input_ids)
    mask[1, 10:] = 0  # a padded sample
    loss_sum, count = summed_loss(model, {"input_ids": input_ids, "attention_mask": mask})
    labels = input_ids.masked_fill(mask == 0, -100)
    expected = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    assert int(count) == 3 * 15 - 6
    torch.testing.assert_close(loss_sum / count, expected, rtol=1e-5, atol=1e-6)
