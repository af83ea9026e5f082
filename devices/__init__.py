"""Device profiles as data (`profiles.toml`): runtime, precision, context and session settings per target."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qwen2_ref.errors import Qwen2Error

_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    runtime: str  # "onnx" | "coreml"
    memory_gib: float
    bandwidth_gbs: float
    default_dtype: str  # a --dtype, or "auto": the first of `auto_dtypes` whose weights and KV cache fit
    default_context: int
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    auto_dtypes: tuple[str, ...] = ()  # default_dtype "auto": the precisions to try, best first
    activations: str | None = None  # quantized ONNX precisions compute in this (None: their own dtype)
    attention: str | None = None  # ONNX fused attention's batch layout, "bias" | "seqlens" (None: "bias")
    threads: int = 0  # 0: ONNX Runtime's default
    onnx_lowering: str = "fused"  # ONNX export: "fused" (ORT contrib kernels) or "function" (portable)
    prefill_chunk: int = 0  # runner: prompt tokens per forward step (bounds attention memory); 0: whole prompt
    coreml_compute_units: str | None = None
    ane_state_multiple: int | None = None
    ane_max_width: int | None = None


@lru_cache(maxsize=1)
def profiles() -> dict[str, DeviceProfile]:
    data = tomllib.loads(_FILE.read_text())
    out = {}
    for name, d in data.items():
        d = dict(d)
        for k in ("execution_providers", "auto_dtypes"):
            if k in d:
                d[k] = tuple(d[k])
        out[name] = DeviceProfile(name=name, **d)
        if out[name].default_dtype == "auto" and not out[name].auto_dtypes:
            raise ValueError(f"{_FILE}: [{name}] default_dtype = \"auto\" needs auto_dtypes")
    return out


def get(name: str) -> DeviceProfile:
    p = profiles()
    if name not in p:
        raise Qwen2Error(f"unknown device profile {name!r}; valid: {', '.join(p)}")
    return p[name]
