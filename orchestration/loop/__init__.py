"""The training loop: stages, the LR schedule, the step, and the decisions callbacks return."""
