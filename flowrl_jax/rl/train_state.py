"""Everything one optimizer step reads and writes: parameters, optimizer state, counters, RNG.

`TrainState` is a pytree whose array leaves are all there is to checkpoint; the NNX
graph definitions ride along as static (hashable) metadata so the jitted step can rebuild
the modules. `params` is a dict of `nnx.State`s keyed by role:

- "policy": the Qwen2 policy (always);
- "z":      Z_φ (FlowRL, `algo.needs_z`), see models/znet.py;
- "value":  PPO's critic (`algo.needs_critic`): a value head Linear(H→1) on the policy
            trunk's final hidden states. The trunk is shared, so the value loss gradient
            (scaled by `algo.vf_coef`) also reaches the transformer, at the policy lr; only
            the head itself uses `algo.critic_lr`. (One forward pass serves both; no second
            7B copy in memory.)

Optimizer (SPEC §2, OptimizerConfig): global grad-norm clip over *all* trained params,
then per role AdamW(b1, b2, eps, weight_decay) with lr × min(1, (k+1)/warmup_steps) at
update k (so the very first update is not a wasted lr = 0 step) and constant afterwards.
Z_φ uses `optimizer.z_lr` when set, else the policy lr; the value head `algo.critic_lr`.
Optimizer moments are nnx Variables with their param's `logical_axes`, so they get the
same shardings as their params.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from flowrl_jax.algos import get_algorithm
from flowrl_jax.config import Config, ModelArch, OptimizerConfig
from flowrl_jax.mesh import logical_axes_of, named_sharding, replicated
from flowrl_jax.models.qwen2 import Numerics, abstract_model
from flowrl_jax.models.znet import ZNet

Array = jax.Array


class ValueHead(nnx.Module):
    """PPO critic head: V = h @ w + b on final hidden states [.., H] → [..], in float32."""

    def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.kernel = nnx.Param(init(rngs.params(), (hidden_size, 1), jnp.float32),
                                logical_axes=("embed", None))
        self.bias = nnx.Param(jnp.zeros((1,), jnp.float32), logical_axes=(None,))

    def __call__(self, hidden: Array) -> Array:
        return (jnp.dot(hidden.astype(jnp.float32), self.kernel[...]) + self.bias[...])[..., 0]


@struct.dataclass
class TrainState:
    """Params (by role), optax state, applied-update counter, base RNG key, skip counter."""

    step: Array  # int32: updates applied so far (skipped steps do not count)
    params: dict[str, Any]  # role → nnx.State
    opt_state: Any
    rng: Array  # base PRNG key (uint32[2]); per-step keys are fold_in(rng, step + skipped)
    skipped: Array  # int32: steps skipped because the loss or a gradient was not finite
    graphdefs: tuple = struct.field(pytree_node=False, default=())  # ((role, GraphDef), ...)

    def graphdef(self, role: str) -> Any:
        """The NNX GraphDef of `role` ("policy", "z" or "value")."""
        for name, gd in self.graphdefs:
            if name == role:
                return gd
        raise KeyError(f"TrainState has no module {role!r} (has {[n for n, _ in self.graphdefs]})")

    def module(self, role: str) -> nnx.Module:
        """The live NNX module of `role` (shares this state's arrays)."""
        return nnx.merge(self.graphdef(role), self.params[role])


# --------------------------------------------------------------------------- optimizer


def warmup_constant(lr: float, warmup_steps: int) -> Callable[[Array], Array]:
    """lr · min(1, (count + 1) / warmup_steps): linear warm-up, then constant."""
    def schedule(count: Array) -> Array:
        if warmup_steps <= 0:
            return jnp.asarray(lr, jnp.float32)
        frac = jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / warmup_steps)
        return lr * frac
    return schedule


def role_lrs(cfg: Config) -> dict[str, float]:
    """Peak learning rate of each parameter role."""
    opt: OptimizerConfig = cfg.optimizer
    return {"policy": opt.lr, "z": opt.z_lr if opt.z_lr is not None else opt.lr,
            "value": cfg.algo.critic_lr}


def make_optimizer(cfg: Config, roles: tuple[str, ...]) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW per role (see module docstring)."""
    opt = cfg.optimizer
    lrs = role_lrs(cfg)

    def adamw(lr: float) -> optax.GradientTransformation:
        return optax.adamw(warmup_constant(lr, opt.warmup_steps), b1=opt.b1, b2=opt.b2,
                           eps=opt.eps, weight_decay=opt.weight_decay)

    def labels(params: dict[str, Any]) -> dict[str, Any]:
        return {role: jax.tree.map(lambda _, r=role: r, sub) for role, sub in params.items()}

    return optax.chain(optax.clip_by_global_norm(opt.grad_clip),
                       optax.multi_transform({r: adamw(lrs[r]) for r in roles}, labels))


def adamw_updates(cfg: Config, opt_state: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The AdamW parameter updates of `make_optimizer`, computed from an optimizer state whose
    moments and counts were already advanced by its `update` (same arithmetic as optax).

    The train step uses this so that the parameter update reads the moments it has just
    written: when it recomputes them from the old moments instead (optax's `update` output),
    XLA:CPU must keep copies of the old moments because they are overwritten in place
    (2 × parameter memory and 240 extra ops per tiny step).
    """
    opt = cfg.optimizer
    lrs = role_lrs(cfg)
    partition = opt_state[1]  # after the global-norm clip's empty state
    out = {}
    for role, sub in params.items():
        adam, _, schedule = partition.inner_states[role].inner_state
        # optax's own bias correction: 1 - b2^t cancels badly in float32, so another way of
        # computing it differs by ~1e-5 relative
        mu_hat = optax.tree.bias_correction(adam.mu[role], opt.b1, adam.count)
        nu_hat = optax.tree.bias_correction(adam.nu[role], opt.b2, adam.count)
        lr = warmup_constant(lrs[role], opt.warmup_steps)(schedule.count - 1)  # count before this step

        def one(m, v, p, lr=lr):
            return (m / (jnp.sqrt(v) + opt.eps) + opt.weight_decay * p) * -lr

        out[role] = jax.tree.map(one, mu_hat, nu_hat, sub)
    return out


# --------------------------------------------------------------------------- shardings


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree: nnx Variables from their logical axes, other leaves replicated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            if not hasattr(x.get_value(), "shape"):
                return x  # e.g. optax's MaskedNode inside a Variable: no array leaves
            return named_sharding(mesh, logical_axes_of(x), x.get_value().shape)
        return replicated(mesh)
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def train_state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """A TrainState-shaped tree of NamedShardings (works on abstract states too)."""
    return tree_shardings(state, mesh)


# --------------------------------------------------------------------------- creation


def _init_module_sharded(ctor: Callable[[], nnx.Module], mesh: Mesh) -> tuple[Any, Any]:
    """(graphdef, state) of a module created directly in its shardings."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    shardings = tree_shardings(abstract, mesh)

    def make():
        with nnx.use_eager_sharding(False):
            return nnx.state(ctor())

    return graphdef, jax.jit(make, out_shardings=shardings)()


def _as_key(rng: Array | int) -> Array:
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    rng = jnp.asarray(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
        raise ValueError(f"create_train_state: rng must be an int seed or a uint32[2] key, got "
                         f"{rng.dtype}{list(rng.shape)}")
    return rng


def create_train_state(cfg: Config, model: nnx.Module, mesh: Mesh,
                       rng: Array | int = 0) -> TrainState:
    """TrainState for `cfg.algo.name` around `model` (the policy), placed on `mesh`.

    Adds Z_φ (FlowRL) or the value head (PPO) with fresh random weights, builds the
    optimizer state directly in the shardings of the params it follows. `model`'s arrays
    become the state's policy params (they are donated by the train step afterwards: take a
    copy with `copy_params` first if you still need them, e.g. as the reference model).
    """
    algo = get_algorithm(cfg.algo.name)
    key = _as_key(rng)
    gd_policy, policy = nnx.split(model)
    others = [type(v).__name__ for v in jax.tree.leaves(
        policy, is_leaf=lambda x: isinstance(x, nnx.Variable)) if not isinstance(v, nnx.Param)]
    if others:
        raise ValueError(f"create_train_state: the policy holds non-Param variables {others}")
    policy = jax.device_put(policy, tree_shardings(policy, mesh))
    graphdefs = [("policy", gd_policy)]
    params: dict[str, Any] = {"policy": policy}
    hidden = model.arch.hidden_size
    kz, kv, kstate = jax.random.split(key, 3)
    if algo.needs_z:
        seed_z = int(jax.random.randint(kz, (), 0, 2**31 - 1))
        gd, st = _init_module_sharded(
            lambda: ZNet(hidden, cfg.algo.z_depth, cfg.algo.z_dropout, cfg.algo.detach_z_input,
                         rngs=nnx.Rngs(seed_z)), mesh)
        graphdefs.append(("z", gd))
        params["z"] = st
    if algo.needs_critic:
        seed_v = int(jax.random.randint(kv, (), 0, 2**31 - 1))
        gd, st = _init_module_sharded(lambda: ValueHead(hidden, rngs=nnx.Rngs(seed_v)), mesh)
        graphdefs.append(("value", gd))
        params["value"] = st
    tx = make_optimizer(cfg, tuple(params))
    opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    rep = replicated(mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                      opt_state=opt_state, rng=jax.device_put(kstate, rep),
                      skipped=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      graphdefs=tuple(graphdefs))


def abstract_tree(tree: Any, mesh: Mesh) -> Any:
    """`tree` with every array leaf a ShapeDtypeStruct carrying its NamedSharding on `mesh`
    (nnx Variables by their logical axes, other leaves replicated): what `jit(...).lower`
    takes in place of arrays; nothing is allocated."""
    def one(x):
        if isinstance(x, nnx.Variable):
            v = x.get_value()
            if not hasattr(v, "shape"):
                return x
            sh = named_sharding(mesh, logical_axes_of(x), v.shape)
            return x.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh))
    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_train_state(cfg: Config, arch: ModelArch, mesh: Mesh) -> TrainState:
    """The TrainState `create_train_state` would build for a `cfg.model`-numerics policy of
    `arch` on `mesh`, as ShapeDtypeStructs with their shardings (for AOT compilation: no
    array is allocated, no weight read, nothing computed)."""
    algo = get_algorithm(cfg.algo.name)
    gd_policy, policy = nnx.split(abstract_model(arch, Numerics.from_config(cfg.model)))
    graphdefs = [("policy", gd_policy)]
    params: dict[str, Any] = {"policy": policy}
    hidden = arch.hidden_size
    with nnx.use_eager_sharding(False):
        if algo.needs_z:
            gd, st = nnx.split(nnx.eval_shape(
                lambda: ZNet(hidden, cfg.algo.z_depth, cfg.algo.z_dropout,
                             cfg.algo.detach_z_input, rngs=nnx.Rngs(0))))
            graphdefs.append(("z", gd))
            params["z"] = st
        if algo.needs_critic:
            gd, st = nnx.split(nnx.eval_shape(lambda: ValueHead(hidden, rngs=nnx.Rngs(0))))
            graphdefs.append(("value", gd))
            params["value"] = st
    params = abstract_tree(params, mesh)
    opt_state = abstract_tree(jax.eval_shape(make_optimizer(cfg, tuple(params)).init, params),
                              mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
    return TrainState(step=scalar, params=params, opt_state=opt_state, rng=rng, skipped=scalar,
                      graphdefs=tuple(graphdefs))


def copy_params(params: Any) -> Any:
    """A fresh copy of a params tree (new buffers; safe from the train step's donation)."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, params)


def reference_params(state: TrainState) -> dict[str, Any]:
    """{"policy": copy of the current policy params}: the frozen reference model's params."""
    return {"policy": copy_params(state.params["policy"])}


class FrozenReference:
    """A frozen copy of the initial policy params, for the reference log-probs; with
    `offload` it waits in host memory between steps (`trainer.ref_offload`)."""

    def __init__(self, policy_params: Any, offload: bool = False):
        ref = copy_params(policy_params)
        self.offload = offload
        if offload:
            self._shardings = jax.tree.map(lambda x: x.sharding, ref)
            ref = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if x.is_fully_addressable
                               else x, ref)
        self._params = ref

    def on_device(self) -> Any:
        """The reference params on the devices (put back there for this step when offloaded)."""
        if not self.offload:
            return self._params
        return jax.device_put(self._params, self._shardings)
