"""Pure numpy quantization math: no graphs, no ONNX Runtime."""
