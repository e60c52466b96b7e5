"""Ollama's API: `requests` (its request types and their GenerationParams) and `routes`."""
