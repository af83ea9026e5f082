"""ONNX Runtime session from a device profile (or explicit flags), and an honest account of which provider runs it.

onnxruntime-gpu lists CUDAExecutionProvider as available on machines without a usable GPU and silently runs on
CPU (checked with onnxruntime-gpu 1.31), so the providers asked for are compared with `session.get_providers()` after creation and a
mismatch is reported loudly, never papered over.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import devices
from qwen2_ref.errors import CheckpointError, Qwen2Error
from qwen2_ref.progress import console

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class SessionSettings:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 0  # intra-op threads; 0: ONNX Runtime's default (one per physical core)
    device_id: int = 0
    gpu_mem_limit_gib: float = 0.0  # 0: no limit
    prefill_chunk: int = 0  # 0: the whole prompt in one step
    profile_prefix: str | None = None  # write ONNX Runtime's JSON profile (SessionOptions.enable_profiling)

    @classmethod
    def from_profile(cls, name: str, **override) -> "SessionSettings":
        p = devices.get(name)
        s = cls(providers=p.execution_providers, threads=p.threads, prefill_chunk=p.prefill_chunk,
                gpu_mem_limit_gib=p.memory_gib if CUDA in p.execution_providers else 0.0)
        return s.with_(**override)

    def with_(self, **override) -> "SessionSettings":
        kw = {k: v for k, v in override.items() if v is not None}
        if "providers" in kw:
            kw["providers"] = resolve_providers(kw["providers"])
        return SessionSettings(**(self.__dict__ | kw))


def resolve_providers(names) -> tuple[str, ...]:
    """'cuda' -> (CUDA, CPU); 'cpu' -> (CPU,); full provider names pass through. CPU always ends the list."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    out = [PROVIDER_ALIASES.get(n.lower(), n) for n in names]
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return tuple(out)


def provider_options(name: str, s: SessionSettings) -> dict:
    if name == CUDA:
        opts = {"device_id": s.device_id,
                "arena_extend_strategy": "kSameAsRequested",  # grow by what is asked: the KV cache is preallocated
                "cudnn_conv_algo_search": "HEURISTIC",
                "do_copy_in_default_stream": True}
        if s.gpu_mem_limit_gib:
            opts["gpu_mem_limit"] = int(s.gpu_mem_limit_gib * 2**30)
        return opts
    return {}


@dataclass
class Session:
    sess: object  # onnxruntime.InferenceSession
    requested: tuple[str, ...]
    active: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        """Where the KV cache and logits live: 'cuda' when CUDA really runs the graph, else 'cpu'."""
        return "cuda" if self.active and self.active[0] == CUDA else "cpu"


def build_session(onnx_path: Path, s: SessionSettings) -> Session:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if s.threads:
        opts.intra_op_num_threads = s.threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: load-time notes (e.g. the overridable logits_to_keep) are not for users
    if s.profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = s.profile_prefix
    available = set(ort.get_available_providers())
    problems = [f"{p} is not available in this onnxruntime build (installed: {', '.join(sorted(available))})"
                for p in s.providers if p not in available]
    use = [p for p in s.providers if p in available] or ["CPUExecutionProvider"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ORT's own fallback warning; reported below in our words
            sess = ort.InferenceSession(str(onnx_path), opts, providers=use,
                                        provider_options=[provider_options(p, s) for p in use])
    except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... types; all mean "cannot load this file"
        if "GroupQueryAttention:1) has input size 17" in str(e):  # query_seqlens: ORT 1.32's 17th input
            raise Qwen2Error(f"{onnx_path}: its attention (--attention bias: a padding bias and query_seqlens) needs "
                             f"onnxruntime 1.32 or later; this is {ort.__version__} (onnxruntime-gpu's newest is "
                             "1.31): re-export it with --attention seqlens, as the CUDA --device profiles do") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{onnx_path}: ONNX Runtime cannot load it ({first[:300]}); the export is corrupt or "
                              "incomplete: re-export it with --overwrite") from None
    active = tuple(sess.get_providers())
    out = Session(sess, tuple(s.providers), active, problems)
    for p in s.providers:
        if p != "CPUExecutionProvider" and p not in active and not any(p in w for w in problems):
            out.warnings.append(f"{p} was requested but the session runs on {', '.join(active)}")
    if CUDA in s.providers and out.device != "cuda":
        out.warnings.append("CUDA WAS REQUESTED BUT IS NOT ACTIVE: everything runs on the CPU. Check the CUDA/cuDNN "
                            "libraries onnxruntime-gpu needs (onnxruntime.preload_dlls(), LD_LIBRARY_PATH) and that "
                            "only onnxruntime-gpu, not onnxruntime, is installed")
    for w in out.warnings:
        console.print(f"[bold red]WARNING:[/] {w}")
    return out


@functools.cache
def cuda_unusable() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run here (None: it can). onnxruntime-gpu lists CUDA as available
    where no GPU is usable and silently falls back to the CPU, so a one-node session is made and its providers
    read; ONNX Runtime's own log lines about the libraries it could not load are silenced meanwhile."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError as e:
        return f"{e.name} is not installed"
    if CUDA not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install the onnx-gpu extra, "
                "onnxruntime-gpu, on a machine with an NVIDIA GPU)")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=[CUDA, "CPUExecutionProvider"])
    except Exception as e:  # ORT's own exception types
        return f"the CUDA provider does not start: {str(e).strip().splitlines()[0][:200]}"
    finally:
        ort.set_default_logger_severity(2)  # ONNX Runtime's default
    if sess.get_providers()[0] != CUDA:
        return (f"onnxruntime-gpu {ort.__version__} is installed but CUDA does not start here (no usable GPU, or "
                "the CUDA 13 / cuDNN 9 libraries it needs are missing): sessions fall back to the CPU")
    return None


def check_graph(sess, path: Path) -> None:
    """The runner needs optimum's I/O names; anything else is not one of our exports."""
    names = {i.name for i in sess.get_inputs()}
    outs = {o.name for o in sess.get_outputs()}
    need = {"input_ids", "attention_mask", "position_ids"}
    if not need <= names or "logits" not in outs or not any(n.startswith("past_key_values.") for n in names):
        raise Qwen2Error(f"{path}: graph inputs {sorted(names)[:6]}... are not a Qwen2 decoder with a KV cache "
                         "(expected input_ids, attention_mask, position_ids, past_key_values.N.key|value -> logits, "
                         "present.N.key|value)")
