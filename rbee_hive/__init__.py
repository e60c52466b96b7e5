"""rbee-hive: one per machine; it alone starts and owns worker processes (DESIGN §1).

It serves the same job API as the queen (`rbee_common.jobs`) for the
operations the queen forwards to it: workers, models, devices. Files:
`config.py`, `service.py` (operations, no HTTP), `app.py` (routes),
`serve.py` (the nursery tree, and `open_hive_service`, which the queen's
--local-hive uses too), `__main__.py` (CLI, signals, stdin lifeline);
`workers.py`, `preflight.py`, `catalog.py`, `downloads.py`, `devices.py`.
It never imports another daemon; the queen's local-hive mode imports it.

A queen operation that reaches it by mistake is refused with WRONG_DAEMON.
"""
