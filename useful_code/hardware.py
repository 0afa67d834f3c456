"""What the machine offers: accelerator, bf16, attention implementation and the device a script runs on."""

from __future__ import annotations

import torch

from useful_code.cli import first_rank


def has_accelerator() -> bool:
    """True when a CUDA (or other torch accelerator) device is present."""
    return torch.cuda.is_available() or bool(getattr(torch, "xpu", None) and torch.xpu.is_available())


def peak_gpu_memory_mib() -> float | None:
    """The most GPU memory this process's tensors have held (torch's allocator), in MiB; None without a GPU."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def bf16_available() -> bool:
    """Whether this machine has a GPU that computes in bf16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(bf16: bool) -> torch.dtype:
    """bf16 only where the hardware supports it; fp32 otherwise (and always on CPU)."""
    if bf16 and bf16_available():
        return torch.bfloat16
    if bf16 and first_rank():
        print("bf16 requested but this machine has no bf16-capable GPU: using fp32")
    return torch.float32


def resolve_attn_implementation(requested: str = "auto", dtype: torch.dtype | None = None) -> str | None:
    """flash_attention_2 on a GPU where flash-attn is installed and the model computes in bf16 or fp16 (flash-attn
    has no fp32 kernels); else None, transformers' own choice: SDPA where the model supports it, eager attention
    where it does not (Gemma-2)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return None


def default_device(index: int = 0) -> str:
    """cuda:index when a GPU is present (and index >= 0, upstream's --device), else the CPU."""
    return f"cuda:{index}" if torch.cuda.is_available() and index >= 0 else "cpu"
