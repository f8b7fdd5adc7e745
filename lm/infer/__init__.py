"""Inference: loading a run (load.py: load_run) and KV-cache decoding (sampling.py)."""
