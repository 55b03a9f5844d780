"""Weight-only quantization: int8 / int4 experts (and optionally linears) for CPU inference."""
