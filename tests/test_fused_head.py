"""On a CPU, TRL's fused LM head (the SFT, DPO, KTO, GRPO, RLOO losses, DPO's reference pass) projects only
the positions that have a label through the LM head, and gives the log-probs (and gradients)
it gave when it projected every position."""

from __future__ import annotations

import torch


def test_the_fused_head_scores_only_labelled_positions_on_cpu_with_the_same_log_probs(
    tiny_model, monkeypatch
):
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    import align.trainers  # noqa: F401  (installs the CPU choice)

    assert trl_utils._use_triton(torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    trl_utils.add_fused_lm_head(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[2:, 18:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100  # the prompt
    labelled = int((labels[:, 1:] != -100).sum())

    rows_seen = []
    real = trl_utils._ChunkedLogProbFunction

    class Spy:
        @staticmethod
        def apply(hidden, *args):
            rows_seen.append(hidden.size(0))
            return real.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        return out.log_probs.detach(), model.lm_head.weight.grad.clone()

    compact_lp, compact_grad = run()
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # TRL's own CPU choice
    full_lp, full_grad = run()
    assert rows_seen == [labelled, ids.size(0) * (ids.size(1) - 1)]
    assert labelled < rows_seen[1] / 2
    assert bool((compact_lp[labels[:, 1:] == -100] == 0).all())
    torch.testing.assert_close(compact_lp, full_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact_grad, full_grad, atol=1e-5, rtol=1e-5)
