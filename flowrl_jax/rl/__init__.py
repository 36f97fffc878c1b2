"""The RL layer: the trainer loop, train step, train state, rollout batch, task and metrics."""
