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
checkpoint/run.py; readable by `load_model` and `convert orbax-to-hf`),
`config.yaml`, `run_info.json` (e.g. the sandbox backend of code rewards), `hf/` (when
`trainer.export_hf`). Running again with the same OUT resumes.

Per step (`rollout_step`), with the file that does each part:
  1. this host's prompts (task prompt source: rl/task.py, data/pipeline.py);
  2. the sampler generates G samples per prompt (rl/rollout_source.py picks it: one JetStream
     request per sample, sampling/jetstream_rollout.py; the engine itself, sampling/engine.py;
     or remote servers) from the trainer's own param arrays, or on several processes from a
     per-host replica (distributed.py), and the rollouts are gathered so every host holds the
     global batch (rl/rollout.py);
  3. padded into a `RolloutBatch` in length buckets (rl/rollout_batch.py);
  4. rewards scored by the task in the Grain rollout pipeline's reward stage, samples
     regrouped by prompt (rl/rollout_pipeline.py), while the device computes old (current
     params) and reference (frozen initial params) log-probs (rl/step_fns.py, rl/logprobs.py);
  5. the algorithm's batch preprocessing: r̂, advantages (algos/);
  6. `trainer.epochs` × shuffled mini-batches (the pipeline's mini-batch stage) through the
     jitted train step (rl/train_step.py);
  7. metrics (rl/metrics.py) to JSONL / TensorBoard / the console (rl/metrics_log.py), and an
     async checkpoint every `trainer.checkpoint_every` steps (checkpoint/run.py).

Determinism: every random choice of step s derives from (cfg.seed, s): the sampler seed,
the mini-batch shuffles and the train step's dropout keys (from the TrainState's own
counter). With the data position restored from the checkpoint, a resumed run repeats an
uninterrupted one exactly.

Asynchronous rollouts (`trainer.staleness: k` ≥ 1, rl/async_rollouts.py): a background thread
draws the prompts and samples step t with policy version max(0, t − k) while the trainer works
on earlier steps; after each update the new params are copied device to device onto the
sampler's shardings (rl/weight_push.py, `time/weight_push`); the losses' importance weights use
the sampler's log-probs (`old_logp` := `sampler_logp`); `time/sampling` is then the wait for
the rollout and `time/generate` its own duration. A checkpoint holds the k rollouts in flight
(their params are gone), so a resumed run still repeats an uninterrupted one. With
`rollout.devices` the sampler has its own sub-mesh (rl/role_meshes.py).

Remote rollout servers (`rollout.servers: [host:port, …]`, sampling/remote_rollouts.py): the
rollouts come from `flowrl-jax serve` processes, the prompts split over them by index; before
each rollout the policy is written to OUT/rollout_weights/v<version> and loaded by every server
that does not hold that version yet (rl/server_weights.py, `time/weight_push`). A server that
fails mid-step is dropped and its prompts retried once on the others, else a SamplingError
stops the run (its checkpoints untouched).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
import yaml

from flowrl_jax.algos import get_algorithm
from flowrl_jax.checkpoint.hf import export_hf
from flowrl_jax.checkpoint.load import arch_from_config, model_from_config
from flowrl_jax.checkpoint.run import RunCheckpoint, check_saved_model
from flowrl_jax.config import Config, ConfigError, config_to_dict
from flowrl_jax.distributed import HostReplica, any_process, to_host
from flowrl_jax.hardware import peak_flops
from flowrl_jax.memory import check_fits
from flowrl_jax.mesh import resolve_axis_sizes
from flowrl_jax.paths import as_path, check_output_dir
from flowrl_jax.rl.async_rollouts import (InFlight, RolloutProducer, in_flight_from_state,
                                          in_flight_state)
from flowrl_jax.rl.metrics import staleness_metrics, step_metrics
from flowrl_jax.rl.metrics_log import MetricsLogger
from flowrl_jax.rl.rollout import gather_rewards, gather_rollout, response_bucket, to_rollout_batch
from flowrl_jax.rl.rollout_batch import minibatches
from flowrl_jax.rl.role_meshes import sampler_device_count, trainer_and_sampler_meshes
from flowrl_jax.rl.rollout_pipeline import RolloutPipeline
from flowrl_jax.rl.rollout_source import build_rollout_source, check_rollout_source
from flowrl_jax.rl.step_fns import StepFns
from flowrl_jax.rl.task import DataTask, PromptBatch, Task, task_from_config
from flowrl_jax.rl.train_state import FrozenReference, create_train_state, with_rollout_step
from flowrl_jax.sampling.engine import SamplingParams

log = logging.getLogger(__name__)

Callback = Callable[["Trainer", int, dict], None]


@dataclass
class TrainResult:
    """What `Trainer.run()` returns."""

    step: int
    state: Any
    history: list[dict] = field(default_factory=list)
    out_dir: Optional[Path] = None
    stopped_by: Optional[str] = None  # "SIGTERM" / "SIGINT" when a signal ended the run early


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
        self._stop_signal: Optional[str] = None

    # ================================================================== set-up

    @property
    def task(self) -> Task:
        """The task (prompts and rewards): the one given, else from the config."""
        if self._task is None:
            self._task = task_from_config(self.cfg) or DataTask(self.cfg)
        return self._task

    def preflight(self) -> Any:
        """Checks that need no compute: the run directory can be made, the model path reads
        (weight headers included), the run's saved architecture matches, data readable with
        registered rewards, memory fits; returns the arch."""
        cfg = self.cfg
        check_output_dir(self.out)
        arch = arch_from_config(cfg.model)
        if self.allow_resume:
            check_saved_model(self.out, arch, cfg.model.param_dtype)
        try:
            task = self.task
        except ConfigError:
            raise
        except (OSError, ValueError) as e:  # e.g. the tokenizer of the data task
            raise ConfigError(f"model.tokenizer: cannot load the tokenizer "
                              f"({cfg.model.tokenizer or cfg.model.path or 'packaged'}): {e}") from e
        check = getattr(task, "check", None)
        if check is not None:
            try:
                check()
            except ConfigError:
                raise
            except (OSError, ValueError) as e:
                raise ConfigError(f"data.train: cannot read the training data: {e}") from e
        check_rollout_source(cfg, self.out)
        if (cfg.trainer.staleness or cfg.rollout.devices is not None) and jax.process_count() > 1:
            key = "trainer.staleness" if cfg.trainer.staleness else "rollout.devices"
            raise ConfigError(f"{key}: asynchronous rollouts and a sampler sub-mesh run on one "
                              f"process only (this run has {jax.process_count()})")
        n_devices = self._mesh.devices.size if self._mesh is not None else jax.device_count()
        n_sampler = None
        if cfg.rollout.devices is not None:  # the trainer's share of the devices
            n_sampler = sampler_device_count(cfg.rollout.devices, n_devices)
            shape = resolve_axis_sizes(cfg.mesh, n_devices - n_sampler)
        elif self._mesh is not None:
            shape = dict(self._mesh.shape)
        else:
            shape = resolve_axis_sizes(cfg.mesh, n_devices)
        self.memory = check_fits(cfg, arch, shape, uses_ref=self.uses_ref,
                                 sampler_local_devices=(jax.local_device_count()
                                                        if jax.process_count() > 1 else None),
                                 sampler_devices=n_sampler)
        return arch

    def setup(self) -> None:
        """Mesh, policy, train state, reference, sampler, data, checkpoint restore."""
        cfg = self.cfg
        self.preflight()  # before any compute
        self._info(self.memory.table())
        self.mesh, self.sample_mesh = trainer_and_sampler_meshes(cfg, self._mesh)
        model, self.arch, tok = model_from_config(cfg.model, self.mesh)
        self.tokenizer_dir = str(tok) if tok is not None else None
        self.sampler_replica = HostReplica(self.sample_mesh)
        self.rollouts = build_rollout_source(cfg, model, self.sample_mesh, self.out, self.arch,
                                             self.tokenizer_dir)
        self.engine = self.rollouts.engine
        self.sampler = self.rollouts.sampler  # what generates (rl/rollout_source.py)
        self.server_push = self.rollouts.server_push  # the weight push to remote servers
        self.push = self.rollouts.push  # the sampler's own copy (staleness, sub-mesh)
        self._server_push_s: dict[int, float] = {}  # step → its servers' push (staleness ≥ 1)
        self.state = create_train_state(cfg, model, self.mesh, rng=cfg.seed)
        self.staleness = cfg.trainer.staleness
        self.producer: Optional[RolloutProducer] = None  # started by the first rollout step
        self._in_flight: list[InFlight] = []  # restored rollouts generated before the restart
        self._consumed_data_state: Any = None  # prompt position after the last rollout taken
        self._sampler_lock = threading.Lock()  # the producer thread and validation share it
        self.phases: list[tuple[str, int, float, float]] = []  # (phase, step, start, end)
        self.ref = (FrozenReference(self.state.params["policy"], cfg.trainer.ref_offload)
                    if self.uses_ref else None)
        self.step_fns = StepFns(cfg, self.algo, self.state, self.mesh)
        self.pi, self.pc = jax.process_index(), jax.process_count()
        self.source = self.task.prompt_source(cfg, self.pi, self.pc)
        self.pipeline = (RolloutPipeline(cfg, self.task, cfg.trainer.reward_threads)
                         if cfg.trainer.rollout_pipeline == "grain" else None)
        self.ckpt = RunCheckpoint(self.out, cfg)
        self.start_step, history = self._restore()
        self._write_run_files()
        loggers = cfg.trainer.loggers
        self.logger = MetricsLogger(self.out, enabled=self.pi == 0, console=self.console,
                                    total_steps=cfg.trainer.steps, history=history,
                                    start_step=self.start_step,
                                    tensorboard="tensorboard" in loggers,
                                    wandb_project=(cfg.trainer.wandb_project
                                                   if "wandb" in loggers else None),
                                    run_config=config_to_dict(cfg))
        self._ready = True

    def _restore(self) -> tuple[int, list[dict]]:
        """Continue from the newest restorable checkpoint; (next step, metric history)."""
        got = self.ckpt.restore(self.state, self.allow_resume, self.arch)
        if got is None:
            return 0, []
        self.state = with_rollout_step(got.state, got.step)  # rollout steps done = saved step
        if got.data_state is not None:
            self.source.set_state(got.data_state)
        if self.pipeline is not None:
            # checkpoints written before the pipeline existed: it was between steps
            self.pipeline.set_state(got.rollout_state or {"steps": got.step, "minibatches": 0})
        self._in_flight = in_flight_from_state((got.rollout_state or {}).get("in_flight", []))
        expected = min(self.staleness, self.cfg.trainer.steps - got.step)
        if self._in_flight and len(self._in_flight) != expected:
            raise ConfigError(f"trainer.staleness: the checkpoint of step {got.step} holds "
                              f"{len(self._in_flight)} rollouts in flight, staleness "
                              f"{self.staleness} expects {expected}; resume with the "
                              "staleness the run was saved with")
        if self._in_flight:
            self._consumed_data_state = got.data_state
        self._info(f"resumed from {self.ckpt.dir} step {got.step}")
        return got.step, got.history

    def _write_run_files(self) -> None:
        if self.pi != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg),
                                                             sort_keys=False))
        self.ckpt.write_model_json(self.arch)
        run_info = getattr(self.task, "run_info", None)
        if run_info is not None:  # e.g. which sandbox backend runs the code rewards
            (self.out / "run_info.json").write_text(json.dumps(run_info(), indent=1) + "\n")

    def _info(self, msg: str) -> None:
        if jax.process_index() == 0:
            log.info(msg)

    def save(self, step: int) -> None:
        """Checkpoint after rollout step `step` (async). With staleness k the rollouts of the
        next k steps (made by params no longer held) go into the meta, and the prompt
        position is the one after them."""
        rollout_state = self.pipeline.get_state() if self.pipeline is not None else None
        if self.producer is None:
            data_state = self.source.get_state()
        else:
            # the thread may be drawing later prompts already: use the recorded positions
            items = self.producer.completed(step, min(step + self.staleness,
                                                      self.cfg.trainer.steps) - 1)
            data_state = items[-1].data_state if items else self._consumed_data_state
            rollout_state = {**(rollout_state or {}), "in_flight": in_flight_state(items)}
        self.ckpt.save(step, self.state, data_state, self.logger.history, rollout_state)

    # ================================================================== one rollout step

    def sampler_params(self) -> Any:
        """The policy params for the sampler: the trainer's own arrays on one process; on
        several, one copy per host (distributed.HostReplica)."""
        return self.sampler_replica(self.state.params["policy"])

    def sample(self, batch: PromptBatch, step: int, params: Any = None,
               version: Optional[int] = None) -> tuple[Any, PromptBatch, Any]:
        """Generate G responses per prompt: (this host's rollout, global batch, global rollout),
        with `params` (default: `sampler_params()`), policy `version` (default: `step`).

        With several processes each samples its own prompts and the rollouts are gathered,
        so every host then holds the same global rollout (process order)."""
        salt = 1 if self.pc == 1 else 1000 + self.pi
        sp = SamplingParams.from_rollout_config(self.cfg.rollout,
                                                seed=step_seed(self.cfg.seed, step, salt))
        params = self.sampler_params() if params is None else params
        with self._sampler_lock:
            if self.server_push is not None:  # the servers serve `params` (skipped if they do)
                seconds = self.server_push(params, step if version is None else version)
                if self.staleness:  # logged with its step (in the background otherwise lost)
                    self._server_push_s[step] = seconds
            ro = self.sampler.generate(params, batch.prompts, sp)
        return (ro,) + gather_rollout(batch, ro, self.pc)

    def _generate(self, step: int, version: int, params: Any) -> InFlight:
        """The producer's work for one step: draw its prompts, sample them with `params`
        (policy `version`) on one process."""
        t0 = time.perf_counter()
        batch = next(self.source)
        ro = self.sample(batch, step, params, version)[0]
        return InFlight(step, version, batch, ro, self.source.get_state(), t0,
                        time.perf_counter())

    def _rollout_of(self, step: int) -> InFlight:
        """The asynchronous rollout of `step` (the producer thread starts on first use, from
        the restored in-flight rollouts and a copy of the current params)."""
        if self.producer is None:
            params, _ = self.push(self.state.params["policy"])
            self.producer = RolloutProducer(self._generate, self.staleness, step,
                                            self.cfg.trainer.steps, step, params,
                                            self._in_flight, timeout_s=self.cfg.rollout.timeout_s)
            self._in_flight = []
        return self.producer.get(step)

    def score(self, batch: PromptBatch, ro: Any) -> tuple[np.ndarray, float]:
        """Rewards of this host's rollout by the task, and the seconds scoring took."""
        t0 = time.perf_counter()
        responses = ro.token_lists()
        rewards = np.asarray(self.task.score(batch, ro.prompt_index, responses), np.float32)
        if rewards.shape != (len(responses),):
            raise ValueError(f"task.score returned shape {rewards.shape}, expected "
                             f"({len(responses)},)")
        return rewards, time.perf_counter() - t0

    def _score_local(self, batch: PromptBatch, ro: Any, step: int) -> tuple[np.ndarray, float]:
        """This host's rewards and scoring seconds: through the rollout pipeline's reward and
        regroup stages (samples of step `step` carry policy version `step`), or `score`."""
        if self.pipeline is None:
            return self.score(batch, ro)
        scored = self.pipeline.score(batch, ro, policy_version=step)
        return scored.rewards, scored.seconds

    def _minibatches(self, data: Any, step: int, max_response: int) -> Iterator[Any]:
        """The step's mini-batches: `trainer.epochs` seeded shuffles of the batch, cut."""
        if self.pipeline is not None:
            yield from self.pipeline.minibatches(data, step, max_response)
            return
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, 2])
        for _ in range(cfg.trainer.epochs):
            yield from minibatches(data, cfg.trainer.mini_batch_size, rng,
                                   cfg.data.length_buckets, max_response)

    def rollout_step(self, step: int) -> dict:
        """Run rollout step `step` (0-based) and return its metrics."""
        cfg = self.cfg
        t: dict[str, float] = {}
        item: Optional[InFlight] = None
        if self.staleness:  # generated in the background; the wait is what was not hidden
            t0 = time.perf_counter()
            item = self._rollout_of(step)
            local_batch, local_ro, version = item.batch, item.rollout, item.version
            batch, ro = gather_rollout(local_batch, local_ro, self.pc)
            t["sampling"] = time.perf_counter() - t0
            self._consumed_data_state = item.data_state
            if item.ended > item.started:  # not restored from a checkpoint
                self.phases.append(("generate", step, item.started, item.ended))
        else:
            params = None
            if self.push is not None:  # on-policy with a sampler sub-mesh: push, then sample
                params, t["weight_push"] = self.push(self.state.params["policy"])
            if self.server_push is not None:  # remote servers: write the policy, servers load it
                with self._sampler_lock:
                    t["weight_push"] = self.server_push(self.state.params["policy"], step)
            t0 = time.perf_counter()
            local_batch = next(self.source)
            local_ro, batch, ro = self.sample(local_batch, step, params)
            t["sampling"] = time.perf_counter() - t0
            self.phases.append(("generate", step, t0, t0 + t["sampling"]))
            version = step
        data = to_rollout_batch(cfg, batch, ro)
        data = data.with_arrays({"policy_version": np.full((data.rows,), version, np.int32)})

        # Rewards are scored (reward workers) while the device computes old/ref log-probs.
        with ThreadPoolExecutor(1, thread_name_prefix="score") as pool:
            fut = pool.submit(self._score_local, local_batch, local_ro, version)
            t0 = time.perf_counter()
            ref = self.ref.on_device() if self.ref is not None else None
            data = self.step_fns.logprobs(self.state, ref, data)
            t["logprobs"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            local_rewards, t_score = fut.result()
        rewards = gather_rewards(local_rewards, self.pc)
        t["reward"] = time.perf_counter() - t0  # the part not hidden behind the log-prob pass
        sampler_vs_current = None
        if self.staleness:
            # importance weights against the behaviour policy (the sampler's own log-probs of
            # its tokens), not the current params the log-prob pass used
            mask = data.response_mask.astype(np.float32)
            sampler_vs_current = float(np.sum(np.abs(data.sampler_logp - data.old_logp) * mask)
                                       / max(mask.sum(), 1.0))
            data = data.with_arrays({"old_logp": data.sampler_logp})
        data = self.step_fns.advantages(data.replace(rewards=rewards))

        t0 = time.perf_counter()
        train_metrics, versions = [], []
        for mb in self._minibatches(data, step, response_bucket(cfg, ro)):
            self.state, m = self.step_fns.update(self.state, mb)
            train_metrics.append(m)
            versions.append(np.asarray(mb.policy_version)[np.asarray(mb.seq_mask) > 0])
        self.state = with_rollout_step(self.state, step + 1)  # the warm-up's rollout-step clock
        train_metrics = to_host(train_metrics)
        t["update"] = time.perf_counter() - t0
        self.phases.append(("update", step, t0, t0 + t["update"]))
        if self.producer is not None:  # the new weights to the sampler, if a rollout needs them
            t["weight_push"] = 0.0
            if self.producer.needs(step + 1):
                params, t["weight_push"] = self.push(self.state.params["policy"])
                self.producer.push(step + 1, params)

        peak = peak_flops(getattr(jax.devices()[0], "device_kind", ""))
        n_params = (sum(int(x.size) for x in jax.tree.leaves(self.state.params["policy"]))
                    if peak else 0)
        m = step_metrics(cfg, batch, ro, rewards, data, train_metrics, t,
                         skipped_total=int(jax.device_get(self.state.skipped)),
                         n_params=n_params, uses_ref=self.uses_ref, peak_flops=peak,
                         device_count=jax.device_count())
        m["time/reward_scoring"] = t_score  # total scoring time (mostly overlapped)
        m.update(staleness_metrics(step, versions))
        if item is not None:
            m["time/generate"] = item.seconds  # the generation itself, mostly overlapped
            m["rollout/logp_abs_diff"] = sampler_vs_current  # behaviour vs current params
            if self.server_push is not None:  # the servers' push before generating this step
                m["time/server_weight_push"] = self._server_push_s.pop(step, 0.0)
        return m

    # ================================================================== validation

    def validate(self, step: int) -> dict:
        """Scores on the task's validation batches (eval sampling settings)."""
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
            with self._sampler_lock:  # the rollout producer's thread may be sampling
                if self.server_push is not None:
                    self.server_push(self.sampler_params(), step)
                ro = self.sampler.generate(self.sampler_params(), vb.prompts, sp)
            r = np.asarray(self.task.score(vb, ro.prompt_index, ro.token_lists()), np.float32)
            name = (vb.extra[0].get("set") if vb.extra and vb.extra[0] else None) or f"set{i}"
            out[f"val/{name}/reward"] = float(np.mean(r))
            out[f"val/{name}/accuracy"] = float(np.mean(r > 0))
        out["time/validation"] = time.perf_counter() - t0
        return out

    # ================================================================== run

    def run(self) -> TrainResult:
        """Train from the newest checkpoint (or scratch) to `trainer.steps`.

        SIGTERM (preemption) and Ctrl-C (SIGINT) stop at the next step boundary after a
        checkpoint of that step; rerunning the command continues from it. A second Ctrl-C
        exits at once (complete checkpoints are never touched by an exit).
        """
        try:
            if not self._ready:
                self.setup()
        except BaseException:
            self.close()  # finish the checkpoint manager's threads before the error surfaces
            raise
        cfg = self.cfg.trainer
        done = self.start_step
        stopped = None
        restore_handlers = self._catch_stop_signals()
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
                # agreed by all processes, so all save the same step
                stop = any_process(self._stop_signal is not None)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                    self.save(done)
                if stop:
                    self.ckpt.wait()
                    stopped = self._stop_signal or "SIGTERM"  # another process was signalled
                    self._info(f"stopping after step {done} ({stopped}); rerun to continue")
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
            restore_handlers()
            self.close()
        return TrainResult(max(done, self.start_step), self.state, self.logger.history, self.out,
                           stopped)

    def _catch_stop_signals(self) -> Callable[[], None]:
        """Turn SIGTERM and the first Ctrl-C into a stop request at the next step boundary
        (main thread only); a second Ctrl-C exits at once. Returns the undo function."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_term(signum, frame):
            self._stop_signal = self._stop_signal or "SIGTERM"

        def on_int(signum, frame):
            if self._stop_signal == "SIGINT":
                # Orbax renames a step dir only once complete, so no checkpoint is harmed
                sys.stderr.write("\nflowrl-jax train: second Ctrl-C: exiting now; rerun to "
                                 "continue from the last complete checkpoint\n")
                sys.stderr.flush()
                os._exit(130)
            self._stop_signal = "SIGINT"
            sys.stderr.write("\nflowrl-jax train: Ctrl-C: stopping after this step with a "
                             "checkpoint (Ctrl-C again to exit at once)\n")
            sys.stderr.flush()

        previous = {sig: signal.signal(sig, fn)
                    for sig, fn in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int))}
        return lambda: [signal.signal(sig, fn) for sig, fn in previous.items()]

    def export_hf(self, out_dir: Path) -> None:
        """Write the policy (Z-network / critic stripped) as a HF checkpoint."""
        export_hf(self.state.params["policy"], self.arch, out_dir,
                  tokenizer_dir=self.tokenizer_dir)
        self._info(f"exported the policy to {out_dir}")

    def close(self) -> None:
        """Finish checkpoints, close logs, data and reward workers."""
        for obj, meth in ((getattr(self, "producer", None), "close"),
                          (getattr(self, "ckpt", None), "close"),
                          (getattr(self, "logger", None), "close"),
                          (getattr(self, "source", None), "close"),
                          (getattr(self, "rollouts", None), "close"),
                          (self._task, "close")):
            fn = getattr(obj, meth, None) if obj is not None else None
            if fn is not None:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - closing must not mask the real error
                    log.warning("closing %s failed: %s", type(obj).__name__, e)
