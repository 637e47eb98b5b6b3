"""An OpenAI-compatible LLM inference service on Ray Serve over ONNX Runtime and TensorRT."""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
"""The small model the repository ships and serves by default."""
