"""Evaluating models: per-token log-probabilities of given token ids (scoring.py)."""
