"""A frame in, a stored message and its answer out: pure intake, then the pipeline around the store."""
