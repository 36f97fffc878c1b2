"""The RL loop: sample → reward → advantages → old/ref log-probs → mini-batch updates →
metrics → checkpoint, identical for every `algo.name` (only the loss differs).

Programmatic use:

    from flowrl_jax.rl.trainer import Trainer
    result = Trainer(cfg, "runs/x", task=my_task, callbacks=[fn]).run()   # TrainResult
    result.state            # final TrainState (params by role: policy, z, value; opt state)
    result.history          # per-step metric dicts (also OUT/metrics.jsonl)

`task` is any object with `prompt_source(cfg, process_index, process_count)` and
`score(batch, prompt_index, responses)` (see flowrl_jax/rl/task.py); None → `task.factory`
from the config, else the data pipeline + reward registry. Each callback is called as
`fn(trainer, step, record)` after every rollout step (record = the metrics.jsonl line).

Outputs under OUT: `metrics.jsonl`, `tb/` (TensorBoard), `checkpoints/` (Orbax; see
checkpoint/manager.py; readable by `load_model` and `convert orbax-to-hf`),
`config.yaml`, `hf/` (when `trainer.export_hf`). Running again with the same OUT resumes.

Per step: this host's prompts → sampler (the trainer's own param arrays when the sampler
shares the mesh; on several processes each host samples its prompts on its local devices
from a gathered replica) → rollouts gathered so every host holds the global batch →
rewards scored by the task while the device computes old (current params) and reference
(frozen initial params) log-probs → the algorithm's batch preprocessing (r̂, advantages)
→ `trainer.epochs` × shuffled mini-batches (padded to length buckets) through the jitted
train step → metrics → async checkpoint every `trainer.checkpoint_every` steps.

Determinism: every random choice of step s derives from (cfg.seed, s): the sampler seed,
the mini-batch shuffles and the train step's dropout keys (from the TrainState's own
counter). With the data position restored from the checkpoint, a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import yaml

from flowrl_jax.rl import rollout_batch as RB
from flowrl_jax.algos import get_algorithm
from flowrl_jax.config import Config, ConfigError, MeshConfig, config_to_dict
from flowrl_jax.hardware import peak_flops
from flowrl_jax.paths import as_path, is_url
from flowrl_jax.rl.task import PromptBatch, Task

log = logging.getLogger(__name__)

Callback = Callable[["Trainer", int, dict], None]


@dataclass
class TrainResult:
    """What `Trainer.run()` returns."""

    step: int
    state: Any
    history: list[dict] = field(default_factory=list)
    out_dir: Optional[Path] = None


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A 31-bit seed that depends only on (seed, step, salt)."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0] & 0x7FFFFFFF)


class Trainer:
    """One RL training run (see module docstring)."""

    def __init__(self, cfg: Config, out_dir: str | Path, task: Optional[Task] = None, *,
                 console: bool = True, allow_resume: bool = True,
                 callbacks: Sequence[Callback] = (), mesh: Any = None):
        cfg.validate()
        self.cfg = cfg
        self.out = as_path(out_dir)
        self.algo = get_algorithm(cfg.algo.name)
        self.uses_ref = bool(self.algo.uses_ref(cfg.algo))
        self._task = task
        self.console = console
        self.allow_resume = allow_resume
        self.callbacks = list(callbacks)
        self._mesh = mesh
        self._ready = False

    # ================================================================== set-up

    @property
    def task(self) -> Task:
        if self._task is None:
            from flowrl_jax.rl.task import DataTask, task_from_config

            self._task = task_from_config(self.cfg) or DataTask(self.cfg)
        return self._task

    def preflight(self) -> Any:
        """Checks that need no compute: model path, data readable, memory fits; returns the arch."""
        from flowrl_jax.memory import check_fits
        from flowrl_jax.mesh import resolve_axis_sizes

        cfg = self.cfg
        arch = self._arch_from_config()
        check = getattr(self.task, "check", None)
        if check is not None:
            try:
                check()
            except ConfigError:
                raise
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.train: cannot read the training data: {e}") from e
        if self._mesh is not None:
            shape = dict(self._mesh.shape)
        else:
            shape = resolve_axis_sizes(cfg.mesh, jax.device_count())
        self.memory = check_fits(cfg, arch, shape, uses_ref=self.uses_ref,
                                 sampler_local_devices=(jax.local_device_count()
                                                        if jax.process_count() > 1 else None))
        return arch

    def _arch_from_config(self) -> Any:
        """The architecture from model.arch/preset or the checkpoint's config (no weights read)."""
        cfg = self.cfg
        if cfg.model.path is None:
            if cfg.model.arch is None:
                raise ConfigError("model: set model.path (a HF or Orbax checkpoint) or "
                                  "model.preset")
            return cfg.model.arch
        if not is_url(cfg.model.path) and not Path(cfg.model.path).exists():
            raise ConfigError(f"model.path: {cfg.model.path!r} does not exist")
        try:
            from flowrl_jax.checkpoint.load import model_kind

            kind, d = model_kind(cfg.model.path)
            if kind == "hf":
                from flowrl_jax.checkpoint.hf import read_arch

                return read_arch(d)
            from flowrl_jax.checkpoint.orbax import read_model_json, resolve_checkpoint_dir

            return read_model_json(resolve_checkpoint_dir(d))[0]
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - report any unreadable model dir by key
            raise ConfigError(f"model.path: cannot read {cfg.model.path!r}: {e}") from e

    def setup(self) -> None:
        """Mesh, policy, train state, reference, sampler, data, checkpoint restore."""
        cfg = self.cfg
        self.preflight()  # before the heavy imports and any compute

        from flowrl_jax.checkpoint.manager import TrainCheckpointManager
        from flowrl_jax.mesh import make_mesh
        from flowrl_jax.sampling.engine import SamplingEngine
        from flowrl_jax.rl.train_state import create_train_state

        self._info(self.memory.table())
        self.mesh = self._mesh if self._mesh is not None else make_mesh(cfg.mesh)
        arch, model, self.tokenizer_dir = self._load_policy()
        self.arch = arch
        # Multi-process: every host samples its own prompts on its local devices (the sampler
        # reads tokens back to the host each decode chunk, which needs addressable arrays).
        self.sample_mesh = self.mesh if jax.process_count() == 1 else make_mesh(
            MeshConfig(data=1, fsdp=-1, tensor=1),
            sorted(jax.local_devices(), key=lambda d: d.id))  # same rule on every host
        self.engine = SamplingEngine.from_rollout_config(model, cfg.rollout,
                                                         mesh=self.sample_mesh, verbose=False)
        self.state = create_train_state(cfg, model, self.mesh, rng=cfg.seed)
        self.ref = self._make_reference()
        self.step_fns = _StepFns(cfg, self.algo, self.state, self.mesh)
        self.pi, self.pc = jax.process_index(), jax.process_count()
        self.source = self.task.prompt_source(cfg, self.pi, self.pc)
        self.ckpt = TrainCheckpointManager(str(self.out / "checkpoints"), cfg.trainer.keep_last,
                                           cfg.trainer.keep_every)
        self.start_step, history = self._restore()
        self._write_run_files()
        self.logger = self._make_logger(history)
        self._ready = True

    def _load_policy(self) -> tuple[Any, Any, Optional[str]]:
        """(arch, model, tokenizer dir): from model.path, else random init from the arch."""
        from flowrl_jax.checkpoint.load import model_from_config

        model, arch, tok = model_from_config(self.cfg.model, self.mesh)
        return arch, model, (str(tok) if tok is not None else None)

    def _make_reference(self) -> Optional[Any]:
        """Frozen copy of the initial policy params (host numpy when `trainer.ref_offload`)."""
        if not self.uses_ref:
            return None
        from flowrl_jax.rl.train_state import copy_params

        ref = copy_params(self.state.params["policy"])
        if self.cfg.trainer.ref_offload:
            shardings = jax.tree.map(lambda x: x.sharding, ref)
            ref = (jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if
                                x.is_fully_addressable else x, ref), shardings)
            return ("host",) + ref
        return ref

    def _reference_on_device(self) -> Optional[Any]:
        if self.ref is None or not (isinstance(self.ref, tuple) and self.ref[:1] == ("host",)):
            return self.ref
        _, host, shardings = self.ref
        return jax.device_put(host, shardings)

    def _make_logger(self, history: list[dict]) -> Any:
        from flowrl_jax.rl.metrics_log import MetricsLogger

        return MetricsLogger(self.out, enabled=self.pi == 0, console=self.console,
                             total_steps=self.cfg.trainer.steps, history=history,
                             start_step=self.start_step)

    def _write_run_files(self) -> None:
        if self.pi != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg),
                                                             sort_keys=False))
        from flowrl_jax.checkpoint.orbax import write_model_json

        # model.json makes OUT/checkpoints readable by `convert orbax-to-hf` and load_model
        write_model_json(self.out / "checkpoints", self.arch, self.cfg.model.param_dtype)

    def _info(self, msg: str) -> None:
        if jax.process_index() == 0:
            log.info(msg)

    # ================================================================== checkpoints

    def _policy_tree(self, state: Any) -> Any:
        from flax import nnx

        return nnx.to_pure_dict(state.params["policy"])

    def _train_tree(self, state: Any) -> dict:
        return {"step": state.step, "skipped": state.skipped, "rng": state.rng,
                "opt_state": state.opt_state,
                "params": {k: v for k, v in state.params.items() if k != "policy"}}

    def _fingerprint(self) -> dict:
        c = self.cfg
        return {"algo": c.algo.name, "seed": c.seed, "prompts_per_step": c.rollout.prompts_per_step,
                "samples_per_prompt": c.rollout.samples_per_prompt,
                "mini_batch_size": c.trainer.mini_batch_size}

    def _restore(self) -> tuple[int, list[dict]]:
        """Continue from the newest restorable checkpoint; (next step, metric history)."""
        if not self.ckpt.all_steps():
            return 0, []
        if not self.allow_resume:
            raise ConfigError(f"--out {self.out}: holds checkpoints {self.ckpt.all_steps()} but "
                              "resuming was disabled")

        def check(meta: dict) -> None:
            saved = meta.get("fingerprint", {})
            diff = {k: (saved.get(k), v) for k, v in self._fingerprint().items()
                    if k in saved and saved[k] != v}
            if diff:
                key = next(iter(diff))
                raise ConfigError(f"{'seed' if key == 'seed' else ('algo.name' if key == 'algo' else key)}: "
                                  f"the run in {self.out} was started with {diff[key][0]!r}, now "
                                  f"{diff[key][1]!r}; use a new --out to change it")

        got = self.ckpt.restore_latest(self._policy_tree(self.state), self._train_tree(self.state),
                                       check=check)
        if got is None:
            return 0, []
        step, policy, train, meta = got
        from flax import nnx

        pol = self.state.params["policy"]
        nnx.replace_by_pure_dict(pol, policy)
        params = dict(train["params"], policy=pol)
        self.state = self.state.replace(step=train["step"], skipped=train["skipped"],
                                        rng=train["rng"], opt_state=train["opt_state"],
                                        params=params)
        if meta.get("data_state") is not None:
            self.source.set_state(meta["data_state"])
        self._info(f"resumed from {self.out / 'checkpoints'} step {step}")
        return int(meta["step"]), list(meta.get("history", []))

    def save(self, step: int) -> None:
        """Checkpoint after rollout step `step` (async)."""
        meta = {"step": step, "data_state": self.source.get_state(),
                "history": self.logger.history, "fingerprint": self._fingerprint(),
                "time": time.time()}
        self.ckpt.save(step, self._policy_tree(self.state), self._train_tree(self.state), meta)

    # ================================================================== one rollout step

    def sampler_params(self) -> Any:
        """The policy params for the sampler: the trainer's own arrays on one process; on
        several, one copy per host, sharded over that host's devices (the sampler's mesh)
        and replicated across hosts, built by one resharding jit per step."""
        policy = self.state.params["policy"]
        if self.pc == 1:
            return policy
        if getattr(self, "_host_fn", None) is None:
            self._host_fn = self._make_host_reshard(policy)
        fn, local_shardings = self._host_fn
        hosted = fn(policy)
        leaves, treedef = jax.tree.flatten(hosted)
        local = [jax.make_array_from_single_device_arrays(
            x.shape, sh, [s.data for s in sorted(x.addressable_shards, key=lambda s: s.device.id)])
            if len(x.addressable_shards) > 1 else x.addressable_shards[0].data
            for x, sh in zip(leaves, local_shardings)]
        return jax.tree.unflatten(treedef, local)

    def _make_host_reshard(self, policy: Any) -> tuple[Callable, list]:
        """(jit: training layout → per-host copies, local sharding of each leaf)."""
        from jax.sharding import Mesh, NamedSharding

        from flowrl_jax.mesh import state_shardings

        local = self.sample_mesh
        by_host: dict[int, list] = {}
        for d in jax.devices():
            by_host.setdefault(d.process_index, []).append(d)
        # Every host builds the same mesh: one row per process, devices in id order (which
        # is also the order of each host's sampler mesh).
        rows = [sorted(by_host[pi], key=lambda d: d.id) for pi in sorted(by_host)]
        shape = (len(rows),) + local.devices.shape
        gmesh = Mesh(np.asarray(rows, dtype=object).reshape(shape), ("hosts",) + local.axis_names)
        local_sh = state_shardings(policy, local)  # NamedSharding per nnx Variable
        specs = jax.tree.leaves(local_sh, is_leaf=lambda x: isinstance(x, NamedSharding))
        out = jax.tree.map(lambda sh: NamedSharding(gmesh, sh.spec), local_sh,
                           is_leaf=lambda x: isinstance(x, NamedSharding))
        return jax.jit(lambda p: p, out_shardings=out), specs

    def _gather(self, obj: Any) -> list[Any]:
        """A JSON-able object from every process, in process order."""
        if self.pc == 1:
            return [obj]
        from jax.experimental import multihost_utils

        payload = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        n = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64)))
        buf = np.zeros((int(n.max()),), np.uint8)
        buf[:payload.size] = payload
        allbufs = np.asarray(multihost_utils.process_allgather(buf))
        return [json.loads(bytes(allbufs[i][:int(n.reshape(-1)[i])]).decode())
                for i in range(self.pc)]

    def sample(self, batch: PromptBatch, step: int) -> tuple[Any, PromptBatch, Any]:
        """Generate G responses per prompt: (this host's rollout, global batch, global rollout).

        With several processes each samples its own prompts and the rollouts are gathered,
        so every host then holds the same global rollout (process order)."""
        from flowrl_jax.sampling.engine import Rollout, SamplingParams

        salt = 1 if self.pc == 1 else 1000 + self.pi
        sp = SamplingParams.from_rollout_config(self.cfg.rollout,
                                                seed=step_seed(self.cfg.seed, step, salt))
        ro = self.engine.generate(self.sampler_params(), batch.prompts, sp)
        if self.pc == 1:
            return ro, batch, ro
        parts = self._gather({"p": batch.prompts, "g": batch.ground_truth, "d": batch.data_source,
                              "e": batch.extra, "pi": ro.prompt_index.tolist(),
                              "si": ro.sample_index.tolist(), "len": ro.lengths.tolist(),
                              "fr": list(ro.finish_reasons)})
        from jax.experimental import multihost_utils

        toks = np.asarray(multihost_utils.process_allgather(ro.tokens))
        lps = np.asarray(multihost_utils.process_allgather(ro.logprobs))
        gb, offset, pidx = None, 0, []
        for d in parts:
            b = PromptBatch(d["p"], d["g"], d["d"], d["e"])
            pidx.extend(int(i) + offset for i in d["pi"])
            offset += len(b)
            gb = b if gb is None else gb.concat(b)
        cat = lambda key: [x for d in parts for x in d[key]]  # noqa: E731
        ro_all = Rollout(np.asarray(pidx, np.int32), np.asarray(cat("si"), np.int32),
                         toks.reshape(-1, toks.shape[-1]), lps.reshape(-1, lps.shape[-1]),
                         np.asarray(cat("len"), np.int32), cat("fr"))
        return ro, gb, ro_all

    def score(self, batch: PromptBatch, ro: Any) -> tuple[np.ndarray, float]:
        """Rewards of this host's rollout by the task, and the seconds scoring took."""
        t0 = time.perf_counter()
        responses = ro.token_lists()
        rewards = np.asarray(self.task.score(batch, ro.prompt_index, responses), np.float32)
        if rewards.shape != (len(responses),):
            raise ValueError(f"task.score returned shape {rewards.shape}, expected "
                             f"({len(responses)},)")
        return rewards, time.perf_counter() - t0

    def rollout_step(self, step: int) -> dict:
        """Run rollout step `step` (0-based) and return its metrics."""
        from concurrent.futures import ThreadPoolExecutor

        cfg = self.cfg
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        local_batch = next(self.source)
        local_ro, batch, ro = self.sample(local_batch, step)
        t["sampling"] = time.perf_counter() - t0

        buckets = cfg.data.length_buckets
        plen = RB.bucket(max(len(p) for p in batch.prompts), buckets,
                         max(cfg.data.max_prompt_length, max(len(p) for p in batch.prompts)))
        rlen = RB.bucket(max(int(np.max(ro.lengths)), 1), buckets, cfg.rollout.max_new_tokens)
        data = RB.build_rollout_batch(batch.prompts, ro.prompt_index, ro.tokens, ro.lengths,
                                      np.zeros(len(ro.lengths), np.float32), plen, rlen,
                                      sampler_logp=ro.logprobs)

        # Rewards are scored (reward workers) while the device computes old/ref log-probs.
        with ThreadPoolExecutor(1, thread_name_prefix="score") as pool:
            fut = pool.submit(self.score, local_batch, local_ro)
            t0 = time.perf_counter()
            data.update(self.step_fns.logprobs(self.state, self._reference_on_device(), data))
            t["logprobs"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            local_rewards, t_score = fut.result()
        rewards = (local_rewards if self.pc == 1 else
                   np.asarray([r for part in self._gather(local_rewards.tolist()) for r in part],
                              np.float32))
        t["reward"] = time.perf_counter() - t0  # the part not hidden behind the log-prob pass
        data["rewards"] = rewards

        data.update(self.step_fns.advantages(data))

        t0 = time.perf_counter()
        train_metrics = []
        rng = np.random.default_rng([cfg.seed, step, 2])
        for _ in range(cfg.trainer.epochs):
            for mb in RB.minibatches(data, cfg.trainer.mini_batch_size, rng, buckets, rlen):
                self.state, m = self.step_fns.update(self.state, mb)
                train_metrics.append(m)
        train_metrics = to_host(train_metrics)
        t["update"] = time.perf_counter() - t0

        m = self._step_metrics(step, batch, ro, rewards, data, train_metrics, t)
        m["time/reward_scoring"] = t_score  # total scoring time (mostly overlapped)
        return m

    # ================================================================== metrics

    def _step_metrics(self, step: int, batch: PromptBatch, ro: Any, rewards: np.ndarray,
                      data: dict, train_metrics: list[dict], t: dict) -> dict:
        cfg = self.cfg
        m: dict[str, Any] = {}
        m["reward/mean"] = float(np.mean(rewards))
        m["reward/std"] = float(np.std(rewards))
        m["reward/max"] = float(np.max(rewards))
        m["reward/min"] = float(np.min(rewards))
        m["accuracy"] = float(np.mean(rewards > 0))
        sources = np.asarray([batch.data_source[int(p)] for p in ro.prompt_index])
        for s in sorted(set(sources.tolist())):
            sel = sources == s
            m[f"reward/{s}/mean"] = float(np.mean(rewards[sel]))
            m[f"accuracy/{s}"] = float(np.mean(rewards[sel] > 0))
        if "rhat" in data:
            rh = np.asarray(data["rhat"])
            m["rhat/mean"], m["rhat/std"] = float(np.mean(rh)), float(np.std(rh))
            m["rhat/abs_max"] = float(np.max(np.abs(rh)))
        g = cfg.rollout.samples_per_prompt
        if g > 1:
            r = rewards.reshape(-1, g)
            m["reward/frac_groups_all_equal"] = float(np.mean(np.all(r == r[:, :1], axis=1)))
        lengths = np.asarray(ro.lengths)
        m["response_length/mean"] = float(np.mean(lengths))
        m["response_length/max"] = float(np.max(lengths))
        m["response_length/min"] = float(np.min(lengths))
        m["response_length/truncated_frac"] = float(np.mean(
            np.asarray(ro.finish_reasons) == "length"))
        m["prompt_length/mean"] = float(np.mean([len(p) for p in batch.prompts]))
        mask = data["response_mask"].astype(np.float32)
        m["entropy"] = float(np.sum(data["entropy"] * mask) / max(mask.sum(), 1.0))
        # sampler vs trainer log-probs of the same tokens (same params: ~0 up to numerics)
        m["rollout/logp_abs_diff"] = float(np.sum(np.abs(data["sampler_logp"] - data["old_logp"])
                                                  * mask) / max(mask.sum(), 1.0))
        m.update(_mean_metrics(train_metrics))
        m["optimizer/updates"] = len(train_metrics)
        m["optimizer/skipped_total"] = int(jax.device_get(self.state.skipped))
        for k, v in t.items():
            m[f"time/{k}"] = v
        total = sum(t.values())
        m["time/step"] = total
        tokens = float(np.sum(lengths)) + float(np.sum(data["prompt_mask"]))
        m["throughput/tokens_per_s"] = tokens / max(total, 1e-9)
        m["throughput/response_tokens"] = float(np.sum(lengths))
        peak = peak_flops(getattr(jax.devices()[0], "device_kind", ""))
        if peak:
            n_params = sum(int(x.size) for x in jax.tree.leaves(self.state.params["policy"]))
            # forward+backward per epoch (6N) + old/ref log-prob passes (2N each) + sampling (2N)
            passes = 6 * cfg.trainer.epochs + 2 * (2 if self.uses_ref else 1) + 2
            m["perf/mfu"] = passes * n_params * tokens / (total * peak * jax.device_count())
        return m

    # ================================================================== validation

    def validate(self, step: int) -> dict:
        """Scores on the task's validation batches (eval sampling settings)."""
        from flowrl_jax.sampling.engine import SamplingParams

        fn = getattr(self.task, "validation_batches", None)
        if fn is None:
            return {}
        e = self.cfg.eval
        sp = SamplingParams(temperature=0.0 if e.greedy else e.temperature, top_p=e.top_p,
                            max_new_tokens=e.max_new_tokens, n=1 if e.greedy else e.n,
                            seed=step_seed(self.cfg.seed, step, 3))
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        for i, vb in enumerate(fn(self.cfg)):
            ro = self.engine.generate(self.sampler_params(), vb.prompts, sp)
            r = np.asarray(self.task.score(vb, ro.prompt_index, ro.token_lists()), np.float32)
            name = (vb.extra[0].get("set") if vb.extra and vb.extra[0] else None) or f"set{i}"
            out[f"val/{name}/reward"] = float(np.mean(r))
            out[f"val/{name}/accuracy"] = float(np.mean(r > 0))
        out["time/validation"] = time.perf_counter() - t0
        return out

    # ================================================================== run

    def run(self) -> TrainResult:
        """Train from the newest checkpoint (or scratch) to `trainer.steps`.

        SIGTERM (preemption) stops at the next step boundary after a checkpoint of that
        step; rerunning the command continues from it.
        """
        if not self._ready:
            self.setup()
        cfg = self.cfg.trainer
        done = self.start_step
        restore_handler = self._catch_sigterm()
        try:
            for step in range(self.start_step, cfg.steps):
                m = self.rollout_step(step)
                done = step + 1
                if cfg.validate_every and done % cfg.validate_every == 0:
                    m.update(self.validate(done))
                rec = self.logger.log(done, m)
                if done % cfg.log_every == 0:
                    self.logger.table(rec)
                for cb in self.callbacks:
                    cb(self, done, rec)
                stop = self._stop_requested()
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                    self.save(done)
                if stop:
                    self.ckpt.wait()
                    self._info(f"stopping after step {done} (SIGTERM); rerun to continue")
                    break
            else:
                self.ckpt.wait()
                if cfg.export_hf and self.pi == 0:
                    if isinstance(self.out, Path):
                        self.export_hf(self.out / "hf")
                    else:
                        log.warning("trainer.export_hf: %s is remote; export the run with "
                                    "`flowrl-jax convert orbax-to-hf --ckpt %s/checkpoints`",
                                    self.out, self.out)
        finally:
            restore_handler()
            self.close()
        return TrainResult(max(done, self.start_step), self.state, self.logger.history, self.out)

    def _catch_sigterm(self) -> Callable[[], None]:
        """Turn SIGTERM into a stop request (main thread only); returns the undo function."""
        import signal
        import threading

        self._sigterm = False
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            self._sigterm = True

        previous = signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)

    def _stop_requested(self) -> bool:
        """Whether any process got SIGTERM (agreed by all, so they all save the same step)."""
        flag = bool(getattr(self, "_sigterm", False))
        if self.pc == 1:
            return flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))

    def export_hf(self, out_dir: Path) -> None:
        """Write the policy (Z-network / critic stripped) as a HF checkpoint."""
        from flowrl_jax.checkpoint.hf import export_hf

        export_hf(self.state.params["policy"], self.arch, out_dir,
                  tokenizer_dir=self.tokenizer_dir)
        self._info(f"exported the policy to {out_dir}")

    def close(self) -> None:
        """Finish checkpoints, close logs, data and reward workers."""
        for obj, meth in ((getattr(self, "ckpt", None), "close"),
                          (getattr(self, "logger", None), "close"),
                          (getattr(self, "source", None), "close"),
                          (self._task, "close")):
            fn = getattr(obj, meth, None) if obj is not None else None
            if fn is not None:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - closing must not mask the real error
                    log.warning("closing %s failed: %s", type(obj).__name__, e)


def _mean_metrics(ms: list[dict]) -> dict[str, float]:
    """Mean over mini-batch updates of each scalar train-step metric (renamed for reports)."""
    rename = {"kl_ref": "kl/ref", "kl_old": "kl/old", "step": "optimizer/step",
              "skipped": "optimizer/skipped_frac", "lr": "optimizer/lr",
              "grad_norm": "optimizer/grad_norm", "entropy": "entropy/train"}
    drop = {"response_length", "num_seqs", "num_tokens", "skipped_total", "tokens", "seqs",
            "input_tokens"}
    out: dict[str, float] = {}
    keys = sorted({k for m in ms for k in m})
    for k in keys:
        if k in drop:
            continue
        vals = [float(np.asarray(m[k])) for m in ms if k in m and np.asarray(m[k]).size == 1]
        if vals:
            out[rename.get(k, k)] = float(np.mean(vals))
    return out


def to_host(tree: Any) -> Any:
    """numpy copies of (possibly multi-process, batch-sharded) arrays: all rows on every host."""
    def one(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


MODEL_KEYS = ("input_ids", "attention_mask", "response_mask")
UPDATE_KEYS = ("old_logp", "ref_logp", "rhat", "advantages", "returns", "old_values", "rewards",
               "group_ids", "seq_mask")


def model_batch(data: dict) -> dict:
    """prompt ++ response arrays in the train step's layout (see train_step.py)."""
    return {"input_ids": np.concatenate([data["prompt_ids"], data["response_ids"]], axis=1),
            "attention_mask": np.concatenate([data["prompt_mask"], data["response_mask"]], axis=1),
            "response_mask": data["response_mask"]}


class _StepFns:
    """The jitted pieces of train_step.py, adapted to the trainer's host batch dicts."""

    def __init__(self, cfg: Config, algo: Any, state: Any, mesh: Any):
        from flowrl_jax.rl.train_step import make_compute_logprobs, make_train_step

        self.cfg, self.algo = cfg, algo
        self.train = make_train_step(cfg, state, mesh)
        self.old = make_compute_logprobs(cfg, state, mesh, with_entropy=True)
        self.ref = make_compute_logprobs(cfg, state, mesh)
        self._adv = jax.jit(lambda b: algo.advantages(b, cfg.algo))

    def logprobs(self, state: Any, ref: Any, data: dict) -> dict:
        """old_logp (+ entropy, old_values) under the current params, ref_logp under ref."""
        mb = model_batch(data)
        mask = data["response_mask"].astype(np.float32)
        out = to_host(self.old(state.params, mb))
        res = {"old_logp": np.asarray(out["logp"], np.float32) * mask,
               "entropy": np.asarray(out["entropy"], np.float32) * mask}
        if "values" in out:
            res["old_values"] = np.asarray(out["values"], np.float32) * mask
        if ref is not None:
            r = to_host(self.ref({"policy": ref}, mb))
            res["ref_logp"] = np.asarray(r["logp"], np.float32) * mask
        return res

    def advantages(self, data: dict) -> dict:
        """The algorithm's batch-level preprocessing (r̂, advantages, returns) as numpy."""
        keys = ("response_mask", "old_logp", "ref_logp", "rewards", "group_ids", "old_values",
                "seq_mask")
        b = {k: data[k] for k in keys if k in data}
        return {k: np.asarray(v) for k, v in jax.device_get(self._adv(b)).items()}

    def update(self, state: Any, mb: dict) -> tuple[Any, dict]:
        """One optimizer update on a host mini-batch."""
        batch = model_batch(mb)
        batch.update({k: mb[k] for k in UPDATE_KEYS if k in mb})
        return self.train(state, batch)
