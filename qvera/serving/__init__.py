"""Serving: the OpenAI-compatible server (app.py, openai_schema.py), its continuous-batching
scheduler (scheduler.py, kv_rows.py) and adapter store (store.py). Builds on qvera.generation."""
