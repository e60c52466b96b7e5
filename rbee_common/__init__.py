"""What every rbee program shares; daemons import only this, never each other.

`wire` (operations and job events), `errors` (the one error tree),
`validation` (decoding untrusted JSON), `http` (app factory, envelope, SSE,
hypercorn), `jobs` (the job server and its routes), `client` (the job
client), `config` (the TOML file and XDG paths), `daemon` (signals, logging,
the ready line, lifelines).
"""
