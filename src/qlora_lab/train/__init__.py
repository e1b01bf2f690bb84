"""Stage 6 (train) and 7 (save): the loop and its collaborators, checkpoints, the saved adapter."""
