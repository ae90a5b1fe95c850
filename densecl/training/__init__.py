"""Pre-training: the run around the step loop, its hooks, optimiser, schedule and checkpoints."""
