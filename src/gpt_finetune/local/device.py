"""What the engine's device is and what it does with it: the choices of the CUDA path, in one place.

Each choice is a function of ``DeviceFacts``, what torch reports about the device, so the CUDA
branches are tested on machines without a GPU by handing them the facts of one
(tests/test_device.py), and a job's events say which device, precision and attention it got.

- **Precision.** On a GPU with native bf16 (compute capability 8.0 and later: A100, H100, H200,
  L4, RTX 30xx and later), LoRA loads the frozen base weights in bf16 (half the memory and half
  the bytes read per step) and keeps the adapter and AdamW's state in float32 (PEFT casts
  adapter weights to float32 by default), under bf16 autocast. Full training keeps float32
  master weights under bf16 autocast: AdamW's update to a bf16 weight is lost when it is below
  about 1/256 of the weight, which late in a run most updates are. A GPU without native bf16
  (V100, T4) trains in float32 weights under fp16 autocast with loss scaling (the trainer's
  ``fp16``), not in emulated bf16. The CPU and Apple's MPS train in float32: bf16 autocast on a
  CPU without AMX is emulated and measured slower (bench/README.md, ``plain`` against
  ``plain-fp32``).
- **Serving.** The engine serves in bf16 on a GPU with native bf16 and in float32 elsewhere;
  on a CPU with native bf16 (AVX512-BF16 or AMX) bf16 is one setting away
  (``inference_dtype``), measured faster there (``inference_dtype`` says why it is not the
  default).
- **Attention over packed rows.** flash-attention's varlen kernels (``flash_attention_2``:
  transformers reads each example's bounds from the position ids) where the ``flash_attn``
  package is installed and the GPU is one it supports (capability 8.0 and later); elsewhere
  ``packing.PACKED_SDPA``, PyTorch's SDPA called once per packed example.
- **Memory.** On CUDA the plan is made against the device's free memory (``memory.make_plan``'s
  ``device_free_bytes``), so micro-batches grow to fill a large GPU; the CPU's 4 GB default
  limit does not apply there. ``memory_limit_gb`` still caps it when set.
- **Data loading.** On CUDA two loader processes collate the next step's packed micro-batches
  (and pin them) while the GPU runs this one; on the CPU the collation runs in the training
  process, since a loader process there takes a core from the arithmetic.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from ..settings import INFERENCE_DTYPES

FLASH_ATTENTION = "flash_attention_2"


@dataclass(frozen=True)
class DeviceFacts:
    """The device as torch reports it (``facts()``); tests make their own."""

    kind: str = "cpu"  # "cuda" (NVIDIA or ROCm), "mps" or "cpu"
    name: str = "cpu"
    count: int = 0  # CUDA devices visible to this process
    capability: tuple[int, int] | None = None  # CUDA compute capability
    free_bytes: int | None = None  # device memory free now (CUDA)
    total_bytes: int | None = None
    bf16: bool = False  # native bf16 arithmetic (not emulated): a GPU's, or the CPU's AVX512-BF16 / AMX
    flash_attn: bool = False  # the flash_attn package is importable

    def describe(self) -> str:
        if self.kind != "cuda":
            return self.kind
        memory = ""
        if self.free_bytes is not None and self.total_bytes:
            memory = f", {self.free_bytes / 1e9:.1f} of {self.total_bytes / 1e9:.1f} GB free"
        return f"cuda ({self.name}{memory})" + (f" x{self.count} visible" if self.count > 1 else "")


def facts() -> DeviceFacts:
    """This process's device: the current CUDA device where there is one, else MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        try:
            bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # an older torch without the argument
            bf16 = bool(torch.cuda.is_bf16_supported())
        return DeviceFacts(
            kind="cuda",
            name=str(props.name),
            count=torch.cuda.device_count(),
            capability=(int(props.major), int(props.minor)),
            free_bytes=int(free),
            total_bytes=int(total),
            bf16=bf16,
            flash_attn=importlib.util.find_spec("flash_attn") is not None,
        )
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return DeviceFacts(kind="mps", name="mps")
    return DeviceFacts(bf16=cpu_bf16())


def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16: AMD Zen 4 and later, Intel Cooper
    Lake; AMX: Sapphire Rapids and later). Read from the kernel's CPU flags: torch has no public
    call for it (oneDNN's ``_is_mkldnn_bf16_supported`` also answers yes where it only emulates
    bf16 on AVX-512). Elsewhere than Linux: no."""
    try:
        text = open(cpuinfo, encoding="utf-8", errors="replace").read()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


@dataclass(frozen=True)
class Precision:
    weights: str  # the dtype the model is loaded in: "bfloat16" or "float32"
    autocast: str | None  # the trainer's mixed precision: "bf16", "fp16" or None
    reason: str

    @property
    def dtype(self) -> object:
        import torch

        return getattr(torch, self.weights)

    @property
    def activation_bytes(self) -> int:
        """Bytes of one saved activation value under this precision (the memory plan's shape estimate)."""
        return 2 if self.autocast else 4

    def describe(self) -> str:
        mixed = f", {self.autocast} autocast" if self.autocast else ""
        return f"{self.weights} weights{mixed}"


def precision(device: DeviceFacts, training_type: str) -> Precision:
    """How a job's arithmetic is done on ``device`` (the module docstring says why)."""
    if device.kind != "cuda":
        return Precision("float32", None, f"float32 on {device.kind}")
    if device.bf16 and training_type == "lora":
        return Precision("bfloat16", "bf16", "frozen base weights in bf16, the adapter and its optimizer in float32")
    if device.bf16:
        return Precision("float32", "bf16", "float32 master weights under bf16 autocast (full training)")
    return Precision("float32", "fp16", "no native bf16 on this GPU: float32 weights under fp16 autocast")


def attention(device: DeviceFacts) -> str:
    """The attention that keeps packed examples apart on ``device``."""
    from .packing import PACKED_SDPA

    if device.kind == "cuda" and device.flash_attn and (device.capability or (0, 0)) >= (8, 0):
        return FLASH_ATTENTION
    return PACKED_SDPA


def loader_workers(device: DeviceFacts) -> int:
    """Processes collating micro-batches beside training: two on a GPU (and one core kept for
    the training process itself), none on the CPU."""
    if device.kind != "cuda":
        return 0
    return max(0, min(2, (os.cpu_count() or 1) - 1))


def inference_dtype(device: DeviceFacts, requested: str | None = None) -> str:
    """The dtype the engine serves in. ``auto`` (the default): bf16 where a GPU has it natively,
    else float32, on the CPU too. bf16 weights on a CPU with native bf16 serve about 1.7x faster
    (bench/README.md, "bf16 on the CPU"), but change the arithmetic every figure of this project
    was measured in and that a job's own evaluation used, and on a near tie an answer: so on a
    CPU it is asked for (``inference_dtype = bfloat16``, ``serve --dtype bfloat16``), never
    chosen behind the user's back. Asked for where the CPU only emulates it, it is still what
    runs (``describe_inference`` says it is slower there)."""
    choice = requested or "auto"
    if choice not in INFERENCE_DTYPES:
        raise ValueError(f"inference dtype {choice!r}: one of {', '.join(INFERENCE_DTYPES)}")
    if choice != "auto":
        return choice
    return "bfloat16" if device.kind == "cuda" and device.bf16 else "float32"


def describe_inference(device: DeviceFacts, dtype: str) -> str:
    """The engine's dtype for the server's first lines, with what the device makes of it."""
    if dtype == "bfloat16" and device.kind == "cpu" and not device.bf16:
        return "bfloat16 weights (emulated on this CPU: slower than float32)"
    if dtype == "float32" and device.kind == "cpu" and device.bf16:
        return "float32 weights (this CPU has native bf16: --dtype bfloat16 serves faster)"
    return f"{dtype} weights"
