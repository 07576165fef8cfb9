"""Weight quantization algorithms (INT4 block quantization, GPTQ) and their packing."""
