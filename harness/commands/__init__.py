"""The subcommands of `harness …`, by what they need: a cluster
(`cluster.py`) or only this host and its guests (`standalone.py`). The parser
and `main` are in `harness.cli`."""
