"""Serving: the batching engine (engine.py) with its state store (state_store.py), and the OpenAI-compatible server."""
