"""llm-worker-rbee: one loaded model, streaming tokens (DESIGN §3, §4).

Started by a hive (or by hand), it loads one model with a backend
(`backends.py`), serves `POST /v1/inference` as SSE (`app.py`), keeps its
state and slots in `service.py`, heartbeats the queen and watches its
lifeline in `serve.py`. It never imports another daemon.
"""
