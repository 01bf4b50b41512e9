"""Experiments and measurements outside the installed package: the quality study and the
profiling helpers behind experiments/bench.py."""
