"""RL objectives (SPEC §1–§4) behind one registry: `get_algorithm(cfg.name)`.

See `base.py` for the interface (batch/output keys) and `common.py` for the shared math.
"""

# Each algorithm module registers itself on import; a new algorithm is one more line here.
from flowrl_jax.algos import flowrl, grpo, ppo, reinforce_pp  # noqa: F401
from flowrl_jax.algos.base import Algorithm, get_algorithm, list_algorithms, register
# each module registers its algorithm (@register); a new algorithm file is imported here
from flowrl_jax.algos import flowrl, grpo, ppo, reinforce_pp  # noqa: F401,E402  isort: skip
from flowrl_jax.algos.common import (group_normalize, masked_mean, masked_sum,
                                     token_logprobs_from_hidden, token_logprobs_from_logits)

__all__ = ["Algorithm", "get_algorithm", "list_algorithms", "register", "group_normalize",
           "masked_mean", "masked_sum", "token_logprobs_from_hidden", "token_logprobs_from_logits"]
