"""Experiments and measurements outside the installed package: the quality study and the
profiling helpers behind scripts/bench.py."""
