"""Graph I/O and preparation passes (onnx-ir based)."""
