"""Generation: decoding with VeRA adapters, shared by training's demo and evaluation and by the
server. Many adapters beside one base in one batch (bank.py), batched decoding (decode.py),
sampling and log-probabilities (sampling.py), batch-invariant numerics (invariance.py) and the
last-position logits (last_logits.py). Builds on qvera.core and qvera.adapters."""
