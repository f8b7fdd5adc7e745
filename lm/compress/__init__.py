"""Making models smaller: post-training quantization (quantize.py)."""
