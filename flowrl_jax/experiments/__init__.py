"""Small research experiments that run the real trainer on synthetic tasks (`flowrl-jax experiment`)."""
