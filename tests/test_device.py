"""The CUDA path's choices, made from faked device facts on a machine without a GPU
(local/device.py): precision, attention over packed rows, the memory plan against a GPU's free
memory, TRL's mixed-precision flags and the loader processes that collate the next step."""

from __future__ import annotations

import pytest
from conftest import train_spec

from gpt_finetune.local import device
from gpt_finetune.local.device import DeviceFacts

GB = 1_000_000_000
H200 = DeviceFacts("cuda", "NVIDIA H200", 1, (9, 0), 140 * GB, 143 * GB, bf16=True, flash_attn=True)
A100_NO_FLASH = DeviceFacts("cuda", "NVIDIA A100-SXM4-80GB", 8, (8, 0), 79 * GB, 80 * GB, bf16=True)
T4 = DeviceFacts("cuda", "Tesla T4", 1, (7, 5), 15 * GB, 16 * GB, bf16=False, flash_attn=True)
CPU = DeviceFacts()


def test_precision_follows_the_device_and_the_training_type():
    lora, full = device.precision(H200, "lora"), device.precision(H200, "full")
    assert (lora.weights, lora.autocast) == ("bfloat16", "bf16")  # frozen weights: half the bytes
    assert (full.weights, full.autocast) == ("float32", "bf16")  # AdamW updates float32 masters
    old = device.precision(T4, "lora")
    assert (old.weights, old.autocast) == ("float32", "fp16")  # no native bf16: not emulated
    for kind in (CPU, DeviceFacts("mps", "mps")):
        p = device.precision(kind, "lora")
        assert (p.weights, p.autocast, p.activation_bytes) == ("float32", None, 4)
    assert lora.activation_bytes == 2 and str(lora.dtype) == "torch.bfloat16"


def test_flash_attention_only_where_installed_and_supported():
    from gpt_finetune.local.packing import PACKED_SDPA

    assert device.attention(H200) == device.FLASH_ATTENTION
    assert device.attention(A100_NO_FLASH) == PACKED_SDPA  # package missing
    assert device.attention(T4) == PACKED_SDPA  # installed, but the GPU predates its kernels
    assert device.attention(DeviceFacts(flash_attn=True)) == PACKED_SDPA  # the CPU


def test_the_trainer_s_arguments_carry_the_choices(tmp_path, monkeypatch):
    import transformers.training_args

    from gpt_finetune.local.trainer import _training_args

    # transformers checks for a bf16 GPU itself: it is told of the same fake one
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    spec = train_spec(tmp_path, "unused")
    on_h200 = _training_args(spec, 4, 1, H200, device.precision(H200, "lora"), False)
    assert (on_h200.bf16, on_h200.fp16, on_h200.use_cpu) == (True, False, False)
    assert on_h200.dataloader_num_workers == device.loader_workers(H200) and on_h200.dataloader_pin_memory
    on_cpu = _training_args(spec, 4, 1, CPU, device.precision(CPU, "lora"), False)
    assert (on_cpu.bf16, on_cpu.fp16, on_cpu.use_cpu, on_cpu.dataloader_num_workers) == (False, False, True, 0)
    assert device.loader_workers(H200) in (0, 1, 2) and device.loader_workers(CPU) == 0


def test_the_memory_plan_fills_a_gpu_and_still_honours_a_limit():
    from transformers import LlamaConfig

    from gpt_finetune.local.memory import make_plan

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    )  # fmt: skip  (the default model's shape)
    examples = [(1500, 40)] * 64  # a step of 64 real-length issues: about 96k tokens
    kw = dict(config=config, static_bytes=2 * GB, examples=examples, batch_size=64, checkpointing=None)
    gpu = make_plan(
        dtype_bytes=2, memory_limit_gb=None, micro_batch_tokens=None, device_free_bytes=H200.free_bytes, **kw
    )
    assert gpu.target_bytes == H200.free_bytes and gpu.target_source == "free device memory"
    assert gpu.max_micro_batches == 1 and gpu.checkpointing == "off"  # the whole step in one pass
    capped = make_plan(
        dtype_bytes=2, memory_limit_gb=20, micro_batch_tokens=None, device_free_bytes=H200.free_bytes, **kw
    )
    assert capped.target_bytes == 20 * GB and capped.max_micro_batches > 1
    cpu = make_plan(dtype_bytes=4, memory_limit_gb=None, micro_batch_tokens=None, **kw)
    assert cpu.target_bytes <= 4 * GB and cpu.max_micro_batches > capped.max_micro_batches


def test_the_plan_on_a_gpu_counts_the_weights_against_the_memory_free_before_loading(tmp_path, tiny_model_dir):
    """``_memory_plan``'s GPU branch: the target is the device's free memory as read before the
    model was loaded (the facts), and the weights, the optimizer state and the kernels'
    workspaces are the static part; the CPU's 4 GB default is not applied."""
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gpt_finetune.local.trainer import Hooks, _load_data, _memory_plan

    spec = train_spec(tmp_path, tiny_model_dir, memory_limit_gb=None)
    data = _load_data(spec, Hooks())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainer = SimpleNamespace(model=peft, args=SimpleNamespace(device=torch.device("cpu")))
    gpu = DeviceFacts("cuda", "fake", 1, (9, 0), 60 * GB, 80 * GB, bf16=True)
    plan = _memory_plan(spec, trainer, model, data, 4, gpu, device.precision(gpu, "lora"), before_model=7 * GB)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert plan.target_bytes == 60 * GB
    assert plan.static_bytes == weights + 12 * trainable + 512 * 2**20  # the process's CPU memory is not counted
    cpu = _memory_plan(spec, trainer, model, data, 4, CPU, device.precision(CPU, "lora"), before_model=0)
    assert cpu.target_bytes <= 4 * GB


def test_loader_processes_train_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    """The GPU's loader processes (collating the next step's packed micro-batches beside this
    one), run here on the CPU: the weights equal those of collation in the training process.
    Without LoRA dropout: a loader with processes draws their seeds from the training process's
    random stream, which moves every dropout mask after it."""
    from safetensors.torch import load_file

    from gpt_finetune.local.trainer import Hooks, train

    a, b = tmp_path / "inline", tmp_path / "loaders"
    a.mkdir(), b.mkdir()
    lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    train(train_spec(a, tiny_model_dir, n_epochs=2, lora=lora), Hooks())
    monkeypatch.setattr(device, "loader_workers", lambda dev: 2)
    messages: list[str] = []
    train(train_spec(b, tiny_model_dir, n_epochs=2, lora=lora), Hooks(on_message=messages.append))
    wa, wb = (load_file(d / "final" / "adapter_model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert any(" on cpu " in m for m in messages)


@pytest.mark.parametrize("facts", [H200, T4])
def test_a_gpu_is_described_in_the_job_s_events(facts):
    text = facts.describe()
    assert facts.name in text and "GB free" in text
    assert device.precision(facts, "lora").describe().startswith(device.precision(facts, "lora").weights)


ZEN4_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"


@pytest.mark.parametrize(
    ("text", "native"),
    [
        (ZEN4_FLAGS, True),  # AMD Zen 4: AVX512-BF16
        ("flags\t: fpu avx2 avx512f amx_bf16 amx_tile\n", True),  # Intel Sapphire Rapids: AMX
        ("flags\t: fpu sse2 avx2 avx512f avx512bw\n", False),  # AVX-512 without bf16: oneDNN emulates it
        ("processor\t: 0\n", False),
    ],
)
def test_the_cpu_s_native_bf16_is_read_from_its_flags(tmp_path, text, native):
    info = tmp_path / "cpuinfo"
    info.write_text(text)
    assert device.cpu_bf16(str(info)) is native
    assert device.cpu_bf16(str(tmp_path / "absent")) is False  # not Linux: no


def test_the_engine_s_dtype_is_bf16_on_a_bf16_gpu_and_float32_on_a_cpu_unless_asked():
    cpu_bf16 = DeviceFacts(bf16=True)
    assert device.inference_dtype(H200) == device.inference_dtype(H200, "auto") == "bfloat16"
    assert device.inference_dtype(T4) == "float32"  # no native bf16
    # a CPU with native bf16 keeps the float32 every figure was measured in, unless asked
    assert device.inference_dtype(cpu_bf16) == device.inference_dtype(CPU) == "float32"
    assert device.inference_dtype(cpu_bf16, "bfloat16") == device.inference_dtype(CPU, "bfloat16") == "bfloat16"
    assert device.inference_dtype(H200, "float32") == "float32"
    with pytest.raises(ValueError, match="float16"):
        device.inference_dtype(CPU, "float16")
    # what the server's first lines say: a faster choice where there is one, a slow one named
    assert "--dtype bfloat16" in device.describe_inference(cpu_bf16, "float32")
    assert "emulated" in device.describe_inference(CPU, "bfloat16")
    assert device.describe_inference(cpu_bf16, "bfloat16") == "bfloat16 weights"
    assert device.describe_inference(CPU, "float32") == "float32 weights"
    # training on a CPU stays float32 whatever its bf16 (autocast there was measured slower)
    assert device.precision(cpu_bf16, "lora").weights == "float32"
