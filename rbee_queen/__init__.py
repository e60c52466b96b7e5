"""queen-rbee: the brain of an rbee fleet (DESIGN §1).

It serves the job API (`rbee_common.jobs`) to rbee-keeper, keeps the hive
registry from the config, and will schedule inference onto workers and serve
the OpenAI API. Files: `config.py` (settings), `service.py` (operations, no
HTTP), `app.py` (routes), `serve.py` (the nursery tree), `__main__.py` (CLI).
It talks to hives over HTTP (their job API) and never imports other daemons.
"""
