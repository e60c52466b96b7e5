"""The client APIs the queen speaks, one package each, of one shape: `requests.py` (the dialect's
request types, decoded as its clients send them, and how a request becomes `GenerationParams`)
and `routes.py` (its routes, answers and streams). `common` holds what they share (answers,
streams, errors, usage); `toolcalls` reads tool calls out of a model's text."""
