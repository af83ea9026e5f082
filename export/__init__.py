"""Exporters from the PyTorch reference to ONNX Runtime (`export.onnx`) and Core ML (`export.coreml`), sharing one
spine (`export.pipeline`): plan, check, build in a staged folder, prove against the reference, publish.

    from qwen2_ref.checkpoint import resolve_checkpoint
    from export.plan import make_plan
    from export.onnx import export_onnx
    ckpt = resolve_checkpoint("0.5b")
    export_onnx(ckpt, make_plan("onnx", ckpt, dtype="int4", out="exports/q-int4"))
"""
