"""rbee-keeper: the operator's CLI (DESIGN §1).

It talks to queen-rbee only, over the job API (`rbee_common.client`), and
manages the queen's own process (`lifecycle.py`). Narration and progress go to
stderr, results and tokens to stdout, so output can be piped or redirected.
Files: `__main__.py` (the root command), one module per command group
(`infer.py`: infer, embed, status; `queen.py`, `hive.py`, `worker.py`,
`model.py`, `audit.py`), `common.py` (running a job, one-line errors),
`lifecycle.py` (start/stop/health of the queen, ephemeral mode),
`hive_config.py` (editing `[hives.*]` in the config file), `output.py`
(rendering events and results).
"""
