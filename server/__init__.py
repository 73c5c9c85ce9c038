"""Everything the coordinating server runs: the ServerApp, strategies, history and reports."""
