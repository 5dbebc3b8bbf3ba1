"""Generative reward models: LLM judges."""
