"""Training-time LoRA and MLP functions that keep less for the backward pass and cost less.

Measured on SmolLM2-135M (bench/README.md, "Where a step's time goes"), two things of the stock
PEFT/transformers path cost far more than their arithmetic:

- **LoRA dropout.** PEFT applies ``nn.Dropout`` to each adapted layer's input before its ``A``
  matrix. On the CPU the mask comes from ``bernoulli_``, about 10 ms for one 1,478 x 576 input:
  a sixth of a training step for 120 adapted layers. Autograd then keeps, per adapted layer and
  token, the dropped-out input and a float mask (8 bytes per input feature): a third of all the
  activations kept for the backward pass. ``lora_forward`` below draws the mask from 16 random
  bits per element (four elements from one 64-bit draw of torch's generator, so seeds,
  checkpoint recomputation and resume behave as before), keeps it as one byte per element, keeps
  the input itself (shared by q, k and v) and recomputes the dropped-out input in the backward
  pass, which is one multiply. The dropout probability is rounded to a multiple of 1/65,536
  (0.05 becomes 0.050003) and the kept values are scaled by the matching 1/(1 - p), so the
  expectation is unchanged.
- **The SwiGLU MLP** ``down(silu(gate(x)) * up(x))`` keeps ``gate``, ``silu(gate)`` and ``up``
  (three intermediate-size vectors a token). ``swiglu`` keeps ``gate`` and ``up`` and recomputes
  the activation, an elementwise op, in the backward pass.

Both are written by hand because neither PEFT nor transformers offers them on the CPU (Liger's
fused kernels are Triton, GPU only). Results equal the stock path's up to float rounding, which
the tests check against PEFT and autograd; ``fuse`` only touches modules whose shape it knows
and leaves anything else (DoRA, merged or several active adapters, other activations) to the
stock code.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

# dropout masks come from 16-bit lanes of uniform 64-bit integers
_LANES = 65536


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, device: Any = None) -> tuple[torch.Tensor, float]:
    """(kept: uint8 0/1 tensor of ``shape``, scale for the kept values) for dropout probability
    ``p``, rounded to a multiple of 1/65,536. Draws from torch's default generator. (uint8 rather
    than bool: multiplying by it is a third of the time of ``masked_fill`` on the CPU.)"""
    threshold = round(p * _LANES)
    n = math.prod(int(d) for d in shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    kept = (lanes >= threshold - _LANES // 2).view(torch.uint8)
    return kept, _LANES / (_LANES - threshold)


class _LoraDropout(torch.autograd.Function):
    """``(dropout(x) @ A.T) @ B.T * scaling``, keeping x, a one-byte mask and the rank-r middle.
    The dropout's 1/(1 - p) is folded into A (r x features) rather than applied to x."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        kept: torch.Tensor | None,
        keep_scale: float,
        scaling: float,
    ) -> torch.Tensor:
        xd = x if kept is None else x * kept
        mid = xd @ (a * keep_scale).t()
        ctx.save_for_backward(x, a, b, kept, mid)
        ctx.keep_scale, ctx.scaling = keep_scale, scaling
        return mid @ (b * scaling).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, a, b, kept, mid = ctx.saved_tensors
        s, k = ctx.scaling, ctx.keep_scale
        g = grad.reshape(-1, grad.shape[-1])
        grad_b = (g.t() @ mid.reshape(-1, mid.shape[-1])).mul_(s) if ctx.needs_input_grad[2] else None
        gmid = g @ (b * s)  # tokens x r
        grad_a = grad_x = None
        if ctx.needs_input_grad[1]:
            xd = x if kept is None else x * kept
            grad_a = (gmid.t() @ xd.reshape(-1, x.shape[-1])).mul_(k)
        if ctx.needs_input_grad[0]:
            grad_x = (gmid @ (a * k)).view(x.shape)
            if kept is not None:
                grad_x = grad_x.mul_(kept)
        return grad_x, grad_a, grad_b, None, None, None


def lora_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, scaling: float) -> torch.Tensor:
    """A LoRA update with dropout ``p`` on its input, in training."""
    kept, keep_scale = dropout_mask(x.shape, p, x.device) if p > 0 else (None, 1.0)
    out: torch.Tensor = _LoraDropout.apply(x, a, b, kept, keep_scale, scaling)
    return out


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, keeping gate and up only."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_up = grad * gate * sig if ctx.needs_input_grad[1] else None
        # d silu(g)/dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = (1.0 - sig).mul_(gate).add_(1.0).mul_(sig).mul_(up).mul_(grad)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _SwiGLU.apply(gate, up)
    return out


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT ``lora.Linear.forward`` for a training step with one plain LoRA adapter; anything
    else goes to PEFT's own forward."""
    stock = type(self).forward
    active = [k for k in self.active_adapters if k in self.lora_A]
    if (
        not self.training
        or not torch.is_grad_enabled()
        or self.disable_adapters
        or self.merged
        or kwargs.get("adapter_names") is not None
        or len(active) != 1
        or active[0] in getattr(self, "lora_variant", {})
    ):
        return stock(self, x, *args, **kwargs)  # type: ignore[no-any-return]
    name = active[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    dropout = self.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, torch.nn.Dropout) else 0.0
    result = self.base_layer(x, *args, **kwargs)
    xa = self._cast_input_dtype(x, lora_a.weight.dtype)
    update = lora_forward(xa, lora_a.weight, lora_b.weight, p, float(self.scaling[name]))
    return (result + update).to(result.dtype)  # type: ignore[no-any-return]


def _fused_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not self.training or not torch.is_grad_enabled():
        return type(self).forward(self, x)  # type: ignore[no-any-return]
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))  # type: ignore[no-any-return]


def _is_silu(act: Any) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _is_swiglu_mlp(module: Any) -> bool:
    """A Llama-style MLP: the same forward as transformers' ``LlamaMLP`` (compared as bytecode, so
    the many models that copy it match and any that changes it does not) with a SiLU."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    forward = getattr(type(module), "forward", None)
    code, ref = getattr(forward, "__code__", None), LlamaMLP.forward.__code__
    return (
        code is not None
        and code.co_code == ref.co_code
        and code.co_names == ref.co_names
        and _is_silu(getattr(module, "act_fn", None))
    )


def fuse(model: Any) -> dict[str, int]:
    """Switch a model's plain LoRA layers and SwiGLU MLPs to the functions above (per instance;
    the class and saved adapters are untouched). Returns how many of each were switched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    counts = {"lora": 0, "mlp": 0}
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in vars(module):
            ok = all(lin.bias is None for lin in (*module.lora_A.values(), *module.lora_B.values())) and all(
                isinstance(d, torch.nn.Dropout | torch.nn.Identity) for d in module.lora_dropout.values()
            )
            if ok:
                module.forward = types.MethodType(_fused_lora_forward, module)
                counts["lora"] += 1
        elif _is_swiglu_mlp(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            counts["mlp"] += 1
    return counts
