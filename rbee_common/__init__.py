"""What every rbee program shares; daemons import only this, never each other.

`wire` (operations, each with its result type, and job events), `errors`
(the one error tree, every code a class), `validation` (decoding untrusted
JSON), `http` (app factory, envelope, SSE, hypercorn), `jobs` (the job server
and its routes), `client` (the job client, and `map_transport_errors` for
every outbound HTTP call), `config` (the TOML file, written and read, and XDG
paths), `daemon` (signals, logging, the ready line, lifelines).
"""
