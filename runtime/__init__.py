"""ONNX Runtime runner for export folders: session from a device profile, IO-bound KV cache, generation, bench.

    from runtime import Runner, GenerationConfig
    r = Runner("exports/qwen2-0.5b-int4")
    for piece in r.stream("def fibonacci(n):", r.default_config(max_new_tokens=64)):
        print(piece, end="")
"""

from .folder import ExportFolder, open_export
from .runner import Completion, GenerationConfig, Runner, Stats
from .session import Session, SessionSettings, build_session

__all__ = ["Completion", "ExportFolder", "GenerationConfig", "Runner", "Session", "SessionSettings", "Stats",
           "build_session", "open_export"]
