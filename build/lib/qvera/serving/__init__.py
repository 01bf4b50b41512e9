"""Serving: many adapters beside one base (bank.py), batched generation (generation.py) and the
OpenAI-compatible server. Builds on qvera.core and qvera.adapters."""
