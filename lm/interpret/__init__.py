"""Looking inside a decoder: attention maps, the logit lens, token attributions (tools.py)."""
