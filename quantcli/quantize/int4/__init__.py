"""INT4 (and 8-bit) blockwise weights: MatMulNBits or DequantizeLinear."""
