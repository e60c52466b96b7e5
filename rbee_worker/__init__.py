"""llm-worker-rbee: one loaded model, streaming tokens (DESIGN §3, §4)."""
