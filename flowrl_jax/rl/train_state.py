"""Everything one optimizer step reads and writes: parameters, optimizer state, counters, RNG.

`TrainState` is a pytree whose array leaves are all there is to checkpoint; the NNX
graph definitions ride along as static (hashable) metadata so the jitted step can rebuild
the modules. `params` is a dict of `nnx.State`s keyed by role:

- "policy": the Qwen2 policy (always);
- "z":      Z_φ (FlowRL, `algo.needs_z`; `algo.log_z: scalar` → one learned scalar,
            `zero` → no module), see models/znet.py;
- "value":  PPO's critic (`algo.needs_critic`): a value head Linear(H→1). With
            `algo.critic: head` (default) it reads the policy trunk's final hidden states:
            the trunk is shared, so the value loss gradient (scaled by `algo.vf_coef`) also
            reaches the transformer, at the policy lr and inside the policy's clip budget;
            only the head itself uses `algo.critic_lr`. (One forward pass serves both; no
            second 7B copy in memory.)
- "critic": with `algo.critic: model` (veRL's critic) the head reads a separate copy of the
            policy architecture, initialised from the same weights; critic and head learn at
            `algo.critic_lr` and are clipped to `algo.critic_grad_clip` on their own.

Optimizer (SPEC §2, OptimizerConfig): global grad-norm clip over *all* trained params
(with a separate critic model: over the actor's roles and, on its own, over the critic's),
then per role AdamW(b1, b2, eps, weight_decay) with the peak lr times the warm-up factor
`lr_scale`: with `optimizer.warmup_unit: update` min(1, (k+1)/warmup_steps) at update k
(so the very first update is not a wasted lr = 0 step); with `rollout_step` (the official
runs) min(1, s/warmup_steps) for every update of rollout step s (lr 0 in step 0: the
moments move, the params do not). The rollout step is the state's `rollout_step` counter,
which the trainer advances once per rollout step (and restores with the checkpoint).
Z_φ uses `optimizer.z_lr` when set, else the policy lr; the value head (and critic model)
`algo.critic_lr` and `algo.critic_weight_decay` (when set).
Optimizer moments are nnx Variables with their param's `logical_axes`, so they get the
same shardings as their params.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

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
from flowrl_jax.models.znet import ZNet, ZScalar

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
    """Params (by role), optax state, applied-update counter, base RNG key, skip counter,
    rollout-step counter."""

    step: Array  # int32: updates applied so far (skipped steps do not count)
    params: dict[str, Any]  # role → nnx.State
    opt_state: Any
    rng: Array  # base PRNG key (uint32[2]); per-step keys are fold_in(rng, step + skipped)
    skipped: Array  # int32: steps skipped because the loss or a gradient was not finite
    # int32: rollout steps completed, i.e. the index of the rollout step whose updates run
    # now (the warm-up of `optimizer.warmup_unit: rollout_step` reads it)
    rollout_step: Array
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


def lr_scale(opt: OptimizerConfig, update: Array, rollout_step: Array) -> Array:
    """The warm-up factor of the peak lr for update number `update` (0-based, counted over
    the run) inside rollout step `rollout_step` (0-based), by `opt.warmup_unit`."""
    if opt.warmup_steps <= 0:
        return jnp.asarray(1.0, jnp.float32)
    if opt.warmup_unit == "rollout_step":  # torch's constant-with-warm-up: s / warmup_steps
        done = jnp.asarray(rollout_step, jnp.float32)
    else:
        done = jnp.asarray(update, jnp.float32) + 1.0
    return jnp.minimum(1.0, done / opt.warmup_steps)


def role_lrs(cfg: Config) -> dict[str, float]:
    """Peak learning rate of each parameter role."""
    opt: OptimizerConfig = cfg.optimizer
    return {"policy": opt.lr, "z": opt.z_lr if opt.z_lr is not None else opt.lr,
            "value": cfg.algo.critic_lr, "critic": cfg.algo.critic_lr}


def role_weight_decays(cfg: Config) -> dict[str, float]:
    """AdamW weight decay of each parameter role (the critic's own when set)."""
    wd = cfg.optimizer.weight_decay
    critic = getattr(cfg.algo, "critic_weight_decay", None)
    return {"policy": wd, "z": wd, "value": wd if critic is None else critic,
            "critic": wd if critic is None else critic}


#: roles of a separate critic model, clipped on their own (`algo.critic: model`)
CRITIC_ROLES = ("critic", "value")


def clip_by_group_norms(groups: tuple[tuple[tuple[str, ...], float], ...]
                        ) -> optax.GradientTransformation:
    """optax.clip_by_global_norm applied separately to each group of roles ((roles, max
    norm), ...) of a {role: grads} tree; stateless like it, so the optimizer state keeps
    its layout."""
    def update(updates, state, params=None):
        out = dict(updates)
        for roles, max_norm in groups:
            sub = {r: updates[r] for r in roles if r in updates}
            if not sub:
                continue
            g = optax.tree.norm(sub)
            keep = g < max_norm
            out.update(jax.tree.map(
                lambda t: jnp.where(keep, t, (t / g.astype(t.dtype)) * max_norm), sub))
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def gradient_clip(cfg: Config, roles: tuple[str, ...]) -> optax.GradientTransformation:
    """One global-norm clip over every role; with a separate critic model the actor's roles
    and the critic's are clipped apart (each to its own bound, as veRL's two optimizers)."""
    opt = cfg.optimizer
    if "critic" not in roles:
        return optax.clip_by_global_norm(opt.grad_clip)
    actor = tuple(r for r in roles if r not in CRITIC_ROLES)
    return clip_by_group_norms(((actor, opt.grad_clip),
                                (CRITIC_ROLES, cfg.algo.critic_grad_clip)))


def make_optimizer(cfg: Config, roles: tuple[str, ...]) -> optax.GradientTransformation:
    """Global-norm clip, then AdamW per role (see module docstring).

    Its own schedule counts updates; the train step applies `adamw_updates`, which reads
    the warm-up unit (the optimizer state's layout is the same for both units).
    """
    opt = cfg.optimizer
    lrs = role_lrs(cfg)
    wds = role_weight_decays(cfg)

    def adamw(role: str) -> optax.GradientTransformation:
        return optax.adamw(warmup_constant(lrs[role], opt.warmup_steps), b1=opt.b1, b2=opt.b2,
                           eps=opt.eps, weight_decay=wds[role])

    def labels(params: dict[str, Any]) -> dict[str, Any]:
        return {role: jax.tree.map(lambda _, r=role: r, sub) for role, sub in params.items()}

    return optax.chain(gradient_clip(cfg, roles),
                       optax.multi_transform({r: adamw(r) for r in roles}, labels))


def adamw_updates(cfg: Config, opt_state: Any, params: dict[str, Any],
                  rollout_step: Array | int = 0) -> dict[str, Any]:
    """The AdamW parameter updates of `make_optimizer`, computed from an optimizer state whose
    moments and counts were already advanced by its `update` (same arithmetic as optax),
    with the warm-up of `optimizer.warmup_unit` (`rollout_step`: the current rollout step).

    The train step uses this so that the parameter update reads the moments it has just
    written: when it recomputes them from the old moments instead (optax's `update` output),
    XLA:CPU must keep copies of the old moments because they are overwritten in place
    (2 × parameter memory and 240 extra ops per tiny step).
    """
    opt = cfg.optimizer
    lrs = role_lrs(cfg)
    wds = role_weight_decays(cfg)
    partition = opt_state[1]  # after the global-norm clip's empty state
    out = {}
    for role, sub in params.items():
        adam, _, schedule = partition.inner_states[role].inner_state
        # optax's own bias correction: 1 - b2^t cancels badly in float32, so another way of
        # computing it differs by ~1e-5 relative
        mu_hat = optax.tree.bias_correction(adam.mu[role], opt.b1, adam.count)
        nu_hat = optax.tree.bias_correction(adam.nu[role], opt.b2, adam.count)
        # schedule.count - 1: the update count before this step
        lr = lrs[role] * lr_scale(opt, schedule.count - 1, rollout_step)

        def one(m, v, p, lr=lr, wd=wds[role]):
            return (m / (jnp.sqrt(v) + opt.eps) + wd * p) * -lr

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


def role_modules(cfg: Config, hidden: int, seed_z: int = 0,
                 seed_v: int = 0) -> list[tuple[str, Optional[Callable[[], nnx.Module]]]]:
    """The roles an algorithm trains beside the policy, in order, each with the constructor
    of its module (None for `critic`: a copy of the policy): Z_φ or its scalar (FlowRL, unless
    `algo.log_z: zero`), the critic model (`algo.critic: model`), the value head (PPO)."""
    algo = get_algorithm(cfg.algo.name)
    roles: list[tuple[str, Optional[Callable[[], nnx.Module]]]] = []
    if algo.needs_z and cfg.algo.log_z != "zero":  # `zero`: log Z ≡ 0, nothing to learn
        roles.append(("z", (lambda: ZScalar()) if cfg.algo.log_z == "scalar" else
                      (lambda: ZNet(hidden, cfg.algo.z_depth, cfg.algo.z_dropout,
                                    cfg.algo.detach_z_input, rngs=nnx.Rngs(seed_z)))))
    if algo.needs_critic and cfg.algo.critic == "model":
        roles.append(("critic", None))
    if algo.needs_critic:
        roles.append(("value", lambda: ValueHead(hidden, rngs=nnx.Rngs(seed_v))))
    return roles


def create_train_state(cfg: Config, model: nnx.Module, mesh: Mesh,
                       rng: Array | int = 0) -> TrainState:
    """TrainState for `cfg.algo.name` around `model` (the policy), placed on `mesh`.

    Adds Z_φ (FlowRL) or the value head (PPO) with fresh random weights, builds the
    optimizer state directly in the shardings of the params it follows. `model`'s arrays
    become the state's policy params (they are donated by the train step afterwards: take a
    copy with `copy_params` first if you still need them, e.g. as the reference model).
    """
    key = _as_key(rng)
    gd_policy, policy = nnx.split(model)
    others = [type(v).__name__ for v in jax.tree.leaves(
        policy, is_leaf=lambda x: isinstance(x, nnx.Variable)) if not isinstance(v, nnx.Param)]
    if others:
        raise ValueError(f"create_train_state: the policy holds non-Param variables {others}")
    policy = jax.device_put(policy, tree_shardings(policy, mesh))
    graphdefs = [("policy", gd_policy)]
    params: dict[str, Any] = {"policy": policy}
    kz, kv, kstate = jax.random.split(key, 3)
    seeds = [int(jax.random.randint(k, (), 0, 2**31 - 1)) for k in (kz, kv)]
    for role, ctor in role_modules(cfg, model.arch.hidden_size, *seeds):
        if ctor is None:  # veRL's critic: the policy's architecture and weights, trained apart
            graphdefs.append((role, gd_policy))
            params[role] = copy_params(policy)
        else:
            gd, st = _init_module_sharded(ctor, mesh)
            graphdefs.append((role, gd))
            params[role] = st
    tx = make_optimizer(cfg, tuple(params))
    opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    rep = replicated(mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                      opt_state=opt_state, rng=jax.device_put(kstate, rep),
                      skipped=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      rollout_step=jax.device_put(jnp.zeros((), jnp.int32), rep),
                      graphdefs=tuple(graphdefs))


def with_rollout_step(state: TrainState, rollout_step: int) -> TrainState:
    """`state` with its rollout-step counter set to `rollout_step` (same sharding; the
    callback form works when the mesh spans several processes)."""
    value = np.asarray(rollout_step, np.int32)
    arr = jax.make_array_from_callback((), state.rollout_step.sharding, lambda _: value)
    return state.replace(rollout_step=arr)


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
    gd_policy, policy = nnx.split(abstract_model(arch, Numerics.from_config(cfg.model)))
    graphdefs = [("policy", gd_policy)]
    params: dict[str, Any] = {"policy": policy}
    with nnx.use_eager_sharding(False):
        for role, ctor in role_modules(cfg, arch.hidden_size):
            if ctor is None:
                graphdefs.append((role, gd_policy))
                params[role] = policy
            else:
                gd, st = nnx.split(nnx.eval_shape(ctor))
                graphdefs.append((role, gd))
                params[role] = st
    params = abstract_tree(params, mesh)
    opt_state = abstract_tree(jax.eval_shape(make_optimizer(cfg, tuple(params)).init, params),
                              mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
    return TrainState(step=scalar, params=params, opt_state=opt_state, rng=rng, skipped=scalar,
                      rollout_step=scalar, graphdefs=tuple(graphdefs))


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
