"""rbee-keeper: the operator's CLI (DESIGN §1).

It talks to queen-rbee only, over the job API (`rbee_common.client`), and
manages the queen's own process (`lifecycle.py`). Narration and progress go to
stderr, results and tokens to stdout, so output can be piped or redirected.
Files: `lifecycle.py` (start/stop/health of the queen, ephemeral mode),
`output.py` (rendering events), `__main__.py` (the typer commands).
"""
