"""The queen's hives: reaching them (`hives`: over HTTP, or in-process under --local-hive), and over
SSH (`ssh`: all asyncssh code) installing (`remote_install`, with `remote_wheels`), starting and
stopping them (`remote_run`, behind `remote`), and the tunnels of a model split over several
(`split`)."""
