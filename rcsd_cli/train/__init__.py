"""Training: the loop, what one step computes per method, losses, in-loop rollouts, processes and their metrics."""
