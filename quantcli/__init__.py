"""quantcli: post-training quantization of ONNX models."""

__version__ = "0.1.0"
