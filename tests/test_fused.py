"""Fused LoRA dropout and SwiGLU: the same results as PEFT's and transformers' own layers, less kept."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")

import torch

from gpt_finetune.local import fused
from gpt_finetune.local.memory import saved_bytes_per_token
from gpt_finetune.local.packing import pack, packed_loss, use_packed_attention


def lora_model(model_dir, dropout, fuse_it):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    use_packed_attention(model)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    for name, p in model.named_parameters():  # B starts at zero: make every path carry a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    counts = fused.fuse(model) if fuse_it else None
    model.train()
    return model, counts


def micro_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (23, 9, 31):
        ids = torch.randint(5, 900, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - 4) + ids[-4:]})
    return pack(rows)


def loss_and_grads(model, micro):
    loss, count, _ = packed_loss(model, micro)
    (loss / count).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_without_dropout_has_peft_s_loss_and_gradients(tiny_model_dir):
    stock, _ = lora_model(tiny_model_dir, 0.0, False)
    model, counts = lora_model(tiny_model_dir, 0.0, True)
    assert counts == {"lora": 2 * 3, "mlp": 2}  # two layers: q, v, down and the MLP of each
    micro = micro_batch()
    want_loss, want = loss_and_grads(stock, micro)
    got_loss, got = loss_and_grads(model, micro)
    assert torch.allclose(got_loss, want_loss, rtol=1e-6)
    assert got.keys() == want.keys() and any("lora_A" in n for n in got)
    for name in got:
        assert torch.allclose(got[name], want[name], rtol=1e-4, atol=1e-7), name


def test_fused_lora_update_and_its_gradients_with_a_given_mask_match_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    kept = (torch.rand(2, 7, 6, generator=g) > 0.3).to(torch.uint8)
    keep_scale, scaling = 1 / 0.7, 2.0
    out = fused._LoraDropout.apply(x, a, b, kept, keep_scale, scaling)
    reference = ((x * kept * keep_scale) @ a.t()) @ b.t() * scaling
    assert torch.allclose(out, reference)
    assert torch.autograd.gradcheck(
        lambda x, a, b: fused._LoraDropout.apply(x, a, b, kept, keep_scale, scaling), (x, a, b)
    )


def test_swiglu_and_its_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 11, dtype=torch.float64, generator=g) * 4).requires_grad_()
    up = torch.randn(3, 11, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.allclose(fused.swiglu(gate, up), torch.nn.functional.silu(gate) * up)
    assert torch.autograd.gradcheck(fused.swiglu, (gate, up))


def test_dropout_mask_drops_at_the_rate_asked_and_follows_torch_s_seed():
    torch.manual_seed(3)
    kept, scale = fused.dropout_mask((400, 2500), 0.05)
    assert kept.dtype == torch.uint8 and set(kept.unique().tolist()) == {0, 1}
    rate = 1 - kept.double().mean().item()
    assert abs(rate - 0.05) < 5 * (0.05 * 0.95 / 1e6) ** 0.5  # within 5 standard deviations
    assert scale == pytest.approx(1 / (1 - 3277 / 65536))  # p rounded to 1/65536
    rows = kept.double().mean(dim=1)
    assert rows.std().item() < 0.01  # no row pattern
    torch.manual_seed(3)
    again, _ = fused.dropout_mask((400, 2500), 0.05)
    assert torch.equal(kept, again)
    assert not torch.equal(kept, fused.dropout_mask((400, 2500), 0.05)[0])


def test_fused_dropout_gradients_are_the_same_with_activation_checkpointing(tiny_model_dir):
    """Checkpointing recomputes each layer in the backward pass: the masks drawn again must be the
    ones the forward pass used, or the gradient would be wrong."""
    micro = micro_batch()
    results = []
    for checkpointing in (False, True):
        model, _ = lora_model(tiny_model_dir, 0.3, True)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        results.append(loss_and_grads(model, micro))
    (loss_a, a), (loss_b, b) = results
    assert torch.allclose(loss_a, loss_b)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-8), name
    torch.manual_seed(8)  # and a different draw does change them: the dropout is live
    other, _ = loss_and_grads(lora_model(tiny_model_dir, 0.3, True)[0], micro)
    assert not torch.allclose(other, loss_a)


def test_fused_model_keeps_less_for_the_backward_pass(tiny_model_dir):
    stock, _ = lora_model(tiny_model_dir, 0.05, False)
    model, _ = lora_model(tiny_model_dir, 0.05, True)
    before = torch.random.get_rng_state()
    stock_bytes, fused_bytes = saved_bytes_per_token(stock), saved_bytes_per_token(model)
    assert torch.equal(torch.random.get_rng_state(), before)  # measuring draws no random numbers
    # per layer, stock keeps for each of q, v, down its dropped-out input and a float mask, and the
    # MLP's activation; fused keeps a byte mask per input element and no activation
    assert fused_bytes < 0.8 * stock_bytes
    assert fused_bytes > 0


def test_fuse_leaves_models_it_does_not_know_alone(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # not a SwiGLU any more
    config = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    assert fused.fuse(model) == {"lora": 2, "mlp": 0}  # DoRA is left to PEFT at run time
    model.train()
    loss, count, _ = packed_loss(model, micro_batch())
    (loss / count).backward()  # PEFT's own DoRA path ran
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_magnitude" in n)
