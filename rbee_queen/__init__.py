"""queen-rbee: the brain of an rbee fleet (DESIGN §1).

It serves the job API (`rbee_common.jobs`) to rbee-keeper, schedules
inference onto workers, and serves the OpenAI, Anthropic and Ollama APIs.
Files: `config.py` (settings), `service.py` (operations, no HTTP), `app.py`
(routes), `serve.py` (the nursery tree), `__main__.py` (CLI); `hives.py` (the
`Hive` transports: `HttpHive` over a hive's job API, `InProcessHive` under
--local-hive, the one import of `rbee_hive`), `scheduler.py`, `registry.py`,
`heartbeats.py`, `inference.py`; `ssh.py` (all asyncssh code) and
`remote*.py` (hive install, wheel upload, start and stop over SSH);
`openai_api.py`, `anthropic_api.py`, `ollama_api.py` (the dialects).
"""
