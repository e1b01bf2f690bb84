"""Memory: the ledger that predicts a step's GPU memory from the config, and the readings that measure it."""
