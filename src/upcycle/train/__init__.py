"""Training: the config, the loop, losses, the schedule, data and expert parallelism, checkpoints, metrics and the
memory plan."""
