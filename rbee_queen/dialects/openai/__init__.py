"""OpenAI's chat, completions and embeddings: `requests` (its request types and their
GenerationParams) and `routes`."""
