"""Asynchronous rollouts with bounded staleness (`trainer.staleness`) and the sampler's own
sub-mesh (`rollout.devices`): the fixed schedule, the checkpointed in-flight rollouts, and
the trainer end to end on the 8 fake CPU devices (k = 0 equal to the default trainer bit for
bit, also with the engine called directly instead of JetStream; k = 0 and k = 1 on a 4/4
split, k = 1 overlapping generation with updates)."""

import math
import threading
import time

import jax
import numpy as np
import pytest
from trainer_toy import ToyTask, toy_overrides

from flowrl_jax.config import ConfigError, load_config
from flowrl_jax.rl.async_rollouts import (InFlight, RolloutProducer, behaviour_version,
                                          in_flight_from_state, in_flight_state)
from flowrl_jax.rl.metrics import KEY_STYLE, staleness_metrics
from flowrl_jax.rl.role_meshes import role_meshes, sampler_device_count
from flowrl_jax.rl.task import PromptBatch
from flowrl_jax.rl.trainer import Trainer
from flowrl_jax.sampling.results import Rollout

VOLATILE = ("time/", "throughput/", "perf/")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [("trainer.staleness", -1), ("trainer.staleness", 0.5),
                                       ("rollout.devices", 0), ("rollout.devices", 1.5),
                                       ("rollout.devices", -0.5)])
def test_bad_staleness_and_devices_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, toy_overrides("flowrl", 1, **{key: value}))


def test_device_split_by_count_and_fraction():
    assert sampler_device_count(4, 8) == 4 and sampler_device_count(0.25, 8) == 2
    for bad in (8, 0.01):  # the trainer or the sampler would be left without a device
        with pytest.raises(ConfigError, match="rollout.devices"):
            sampler_device_count(bad, 8)
    cfg = load_config(None, toy_overrides("flowrl", 1, **{"rollout.devices": 0.25}))
    trainer, sampler = role_meshes(cfg)
    devs = jax.devices()
    assert list(trainer.devices.flat) == devs[:6] and list(sampler.devices.flat) == devs[6:]
    assert dict(trainer.shape) == {"data": 1, "fsdp": 6, "tensor": 1}


# --------------------------------------------------------------------------- the schedule


def _fake_rollout(step: int) -> Rollout:
    rng = np.random.default_rng(step)
    pairs = np.arange(2, dtype=np.int32)
    return Rollout(np.repeat(pairs, 2), np.tile(pairs, 2),
                   rng.integers(0, 9, (4, 5)).astype(np.int32),
                   rng.normal(size=(4, 5)).astype(np.float32), np.full(4, 5, np.int32),
                   ["stop", "length", "stop", "stop"])


@pytest.mark.parametrize("k", [1, 2])
def test_producer_follows_the_fixed_schedule(k):
    """Rollout t is made by version max(0, t − k), never earlier than that version exists,
    while the 'trainer' consumes in order and pushes version s + 1 after step s."""
    made, pushed_at = [], {0: time.perf_counter()}

    def generate(step, version, params):
        assert params == f"params-{version}"
        made.append((step, version, time.perf_counter()))
        return InFlight(step, version, PromptBatch([[1]], [0], ["toy"]), _fake_rollout(step),
                        {"k": step + 1}, 0.0, 1.0)

    steps = 6
    prod = RolloutProducer(generate, k, 0, steps, 0, "params-0")
    for s in range(steps):
        assert prod.get(s).version == behaviour_version(s, k)
        time.sleep(0.01)  # the "update"
        if prod.needs(s + 1):
            pushed_at[s + 1] = time.perf_counter()
            prod.push(s + 1, f"params-{s + 1}")
    prod.close()
    assert [(t, v) for t, v, _ in made] == [(t, max(0, t - k)) for t in range(steps)]
    assert all(at >= pushed_at[v] for _, v, at in made)
    assert not prod.needs(steps - k)  # no rollout left for the last versions


def test_producer_hands_a_sampling_error_to_the_trainer():
    def generate(step, version, params):
        raise RuntimeError(f"sampler died at step {step}")

    prod = RolloutProducer(generate, 1, 0, 3, 0, None)
    with pytest.raises(RuntimeError, match="step 0"):
        prod.get(0)
    prod.close()
    assert not any(t.name == "rollout-producer" and t.is_alive() for t in threading.enumerate())


def test_a_hung_sampler_is_named_within_the_timeout():
    from flowrl_jax.errors import SamplingError

    release = threading.Event()

    def generate(step, version, params):
        release.wait(30)
        return InFlight(step, version, PromptBatch([[1]], [0], ["toy"]), _fake_rollout(step),
                        {}, 0.0, 1.0)

    prod = RolloutProducer(generate, 1, 0, 2, 0, None, timeout_s=0.2)
    t0 = time.perf_counter()
    with pytest.raises(SamplingError, match=r"rollout\.timeout_s: the rollout of step 1 "):
        prod.get(0)
    assert time.perf_counter() - t0 < 5
    release.set()
    assert prod.get(0).step == 0
    prod.close()


def test_in_flight_rollouts_survive_the_checkpoint_meta_bit_for_bit():
    import json

    items = [InFlight(s, s - 1, PromptBatch([[3, 4], [5]], [7, "x"], ["toy", "toy"],
                                            [{"set": "a"}, {}]),
                      _fake_rollout(s), {"k": s}, 0.0, 1.0) for s in (3, 4)]
    back = in_flight_from_state(json.loads(json.dumps(in_flight_state(items))))
    for a, b in zip(items, back):
        assert (a.step, a.version, a.data_state) == (b.step, b.version, b.data_state)
        assert a.batch == b.batch
        for f in ("prompt_index", "sample_index", "tokens", "logprobs", "lengths"):
            x, y = getattr(a.rollout, f), getattr(b.rollout, f)
            assert x.dtype == y.dtype and np.array_equal(x, y), f
        assert a.rollout.finish_reasons == b.rollout.finish_reasons


def test_staleness_of_each_minibatch():
    m = staleness_metrics(5, [np.asarray([5, 5, 4]), np.asarray([3, 3])])
    assert m == {"rollout/staleness_mean": pytest.approx((1 / 3 + 2) / 2),
                 "rollout/staleness_max": 2.0}
    assert all(KEY_STYLE.fullmatch(k) for k in m)


# --------------------------------------------------------------------------- end to end

STEPS = 4
BASE = {"trainer.checkpoint_every": 100, "trainer.epochs": 2}
UPDATES_PER_STEP = 4  # 16 rows / mini-batch 8 × 2 epochs


def _run(tmp, name, paced=False, **extra):
    """One in-process run; `paced`: the sampler thread starts the rollout of step t ≥ 2 only
    once the update of step t − 1 has begun. The tiny sampler is otherwise done before the
    trainer reaches its update (the log-prob pass comes first), so whether the intervals
    meet would depend on the load; paced, they do exactly when the trainer really updates
    while a rollout is generated (a synchronous trainer generates after its update: no
    overlap, and the test fails)."""
    cfg = load_config(None, toy_overrides("flowrl", STEPS, **BASE, **extra))
    tr = Trainer(cfg, tmp / name, task=ToyTask(cfg), console=False)
    if paced:
        tr.setup()
        update_began = [threading.Event() for _ in range(STEPS)]
        real_update, real_generate, calls = tr.step_fns.update, tr._generate, [0]

        def update(state, mb):
            update_began[calls[0] // UPDATES_PER_STEP].set()
            calls[0] += 1
            return real_update(state, mb)

        def generate(step, version, params):
            if step >= 2:
                assert update_began[step - 1].wait(120)
            return real_generate(step, version, params)

        tr.step_fns.update, tr._generate = update, generate
    res = tr.run()
    return tr, res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The default trainer (JetStream rollouts), trainer.staleness=0 with the engine called
    directly, k = 0 and k = 1 on a 4/4 split; and the driver threads alive after them."""
    tmp = tmp_path_factory.mktemp("staleness")
    got = {"default": _run(tmp, "default", **{"rollout.backend": "jetstream"}),
           "k0": _run(tmp, "k0", **{"trainer.staleness": 0, "rollout.backend": "engine"}),
           "split0": _run(tmp, "split0", **{"rollout.devices": 4}),
           "k1": _run(tmp, "k1", paced=True, **{"trainer.staleness": 1, "rollout.devices": 4,
                                                 "rollout.backend": "jetstream"})}
    from flowrl_jax.sampling.jetstream_compat import DriverThread
    got["driver_threads"] = [t for t in threading.enumerate()
                             if isinstance(t, DriverThread) and t.is_alive()]
    return got


def _stable(history):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in history]


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_staleness_zero_is_the_default_trainer_bit_for_bit(runs):
    """The default (JetStream rollouts, k = 0) trains exactly as the engine called directly."""
    from flowrl_jax.sampling.jetstream_rollout import JetStreamRollouts

    (tr, a), (tr_engine, b) = runs["default"], runs["k0"]
    assert isinstance(tr.sampler, JetStreamRollouts) and tr_engine.sampler is tr_engine.engine
    # all but the sampler/trainer log-prob gap (the sampler's log-probs differ by rounding)
    drop = lambda h: [{k: v for k, v in r.items() if k != "rollout/logp_abs_diff"}  # noqa: E731
                      for r in _stable(h)]
    assert drop(a.history) == drop(b.history) and len(a.history) == STEPS
    la, lb = _leaves(a.state), _leaves(b.state)
    assert len(la) > 20 and all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert [r["rollout/staleness_max"] for r in a.history] == [0.0] * STEPS


def test_closed_trainers_leave_no_driver_threads(runs):
    assert runs["driver_threads"] == []


def test_staleness_zero_on_split_devices_samples_after_each_update(runs):
    """On-policy with the sampler on its own 4 devices: the new weights are pushed before
    every rollout, which starts only after the previous update; the first rollout (initial
    weights, same seeds) is the shared-devices one."""
    (tr, res), (_, default) = runs["split0"], runs["default"]
    assert len(tr.mesh.devices.flat) == 4 and len(tr.sample_mesh.devices.flat) == 4
    assert not set(tr.mesh.devices.flat) & set(tr.sample_mesh.devices.flat)
    gen = {s: (a, b) for p, s, a, b in tr.phases if p == "generate"}
    upd = {s: (a, b) for p, s, a, b in tr.phases if p == "update"}
    assert all(gen[s + 1][0] >= upd[s][1] for s in range(STEPS - 1)), tr.phases
    hist = res.history
    assert [r["rollout/staleness_max"] for r in hist] == [0.0] * STEPS
    assert all(r["time/weight_push"] > 0 for r in hist)
    same = [k for k in hist[0] if k.startswith(("reward/", "response_length/"))]
    assert same and all(hist[0][k] == default.history[0][k] for k in same)
    assert all(np.isfinite(x).all() for x in _leaves(res.state))


def test_staleness_one_on_split_devices_overlaps_generation_with_updates(runs):
    tr, res = runs["k1"]
    assert len(tr.mesh.devices.flat) == 4 and len(tr.sample_mesh.devices.flat) == 4
    assert not set(tr.mesh.devices.flat) & set(tr.sample_mesh.devices.flat)
    gen = {s: (a, b) for p, s, a, b in tr.phases if p == "generate"}
    upd = {s: (a, b) for p, s, a, b in tr.phases if p == "update"}
    # the rollout of step s + 1 is generated (by the params after step s − 1) during update s
    overlap = [min(gen[s + 1][1], upd[s][1]) - max(gen[s + 1][0], upd[s][0])
               for s in range(1, STEPS - 1)]
    assert max(overlap) > 0, tr.phases
    hist = res.history
    assert [r["rollout/staleness_mean"] for r in hist] == [0.0] + [1.0] * (STEPS - 1)
    assert [r["rollout/staleness_max"] for r in hist] == [0.0] + [1.0] * (STEPS - 1)
    for r in hist:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["time/weight_push"] >= 0 and r["time/generate"] > 0
    # versions 1 .. STEPS-2 were pushed (the last update's params make no rollout)
    assert [r["time/weight_push"] > 0 for r in hist] == [True] * (STEPS - 2) + [False] * 2


def test_staleness_one_differs_from_on_policy_only_as_expected(runs):
    """Step 1 samples the same rollout (version 0, same seeds) as the on-policy run; later
    steps train on one-update-old samples, so metrics and params part ways, all finite."""
    (_, on), (_, k1) = runs["default"], runs["k1"]
    same = [k for k in on.history[0] if k.startswith(("reward/", "response_length/"))]
    assert same and all(on.history[0][k] == k1.history[0][k] for k in same)
    assert any(on.history[-1][k] != k1.history[-1][k] for k in ("loss/total", "kl/old"))
    la, lb = _leaves(on.state), _leaves(k1.state)
    assert all(np.isfinite(x).all() for x in lb)
    assert any(not np.allclose(x, y) for x, y in zip(la, lb))
    # stale samples: the importance weights are no longer 1 on the first mini-batch
    assert any(abs(r["flowrl/w_mean"] - 1.0) > 1e-6 for r in k1.history[1:])


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_sigkill_and_restart_with_staleness_one_is_bit_exact(tmp_path):
    """The in-flight rollout (made by params no checkpoint holds) is saved in the checkpoint
    meta, so a run killed with SIGKILL and restarted ends bit-identical to an uninterrupted
    one."""
    import json
    import random

    from test_resume import _kill, _steps, _wait, _writing
    from trainer_toy import checkpoint_arrays, stable_records, start_train

    steps = 5
    ov = toy_overrides("flowrl", steps, **{"trainer.staleness": 1, "rollout.backend": "jetstream"})
    ref = start_train(tmp_path / "ref", ov)
    run = tmp_path / "killed"
    rnd = random.Random(20261206)
    p = start_train(run, ov)
    _wait(lambda: len(_steps(run)) >= 2 and not _writing(run), p, 300)
    time.sleep(rnd.uniform(0.0, 0.3))
    _kill(p)
    killed_at = _steps(run)
    p = start_train(run, ov)
    assert p.wait(300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    assert ref.wait(300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert killed_at and killed_at[-1] < steps, killed_at  # it did resume mid-run
    a, b = checkpoint_arrays(tmp_path / "ref", steps), checkpoint_arrays(run, steps)
    assert a.keys() == b.keys() and len(a) > 20
    assert not [k for k in a if not np.array_equal(a[k], b[k])], killed_at
    recs = stable_records(run)
    assert recs == stable_records(tmp_path / "ref") and len(recs) == steps
    assert [r["rollout/staleness_max"] for r in recs] == [0.0] + [1.0] * (steps - 1)
    meta = json.loads((tmp_path / "ref" / "checkpoints" / str(steps - 1) / "meta" / "metadata")
                      .read_text())
    assert [r["step"] for r in meta["rollout_state"]["in_flight"]] == [steps - 1]


def test_samples_carry_their_version_and_behaviour_logprobs():
    from flowrl_jax.rl.rollout_pipeline import samples_of

    ro = _fake_rollout(3)
    ro.lengths[:] = [5, 2, 0, 3]
    got = samples_of(ro, 2)
    assert [s.policy_version for s in got] == [2] * 4
    assert [list(s.logprobs) for s in got] == ro.logprob_lists()
    assert [len(s.tokens) for s in got] == [5, 2, 0, 3]


def test_weight_push_copies_device_to_device_onto_the_sampler_layout():
    """A copy in the sampler mesh's shardings, equal values, never an alias of the trainer's
    (donated) buffers, also when both roles share the devices."""
    from flax import nnx

    from flowrl_jax.checkpoint.load import model_from_config
    from flowrl_jax.rl.weight_push import WeightPush

    cfg = load_config(None, toy_overrides("flowrl", 1, **{"rollout.devices": 4}))
    trainer_mesh, sampler_mesh = role_meshes(cfg)
    model, _, _ = model_from_config(cfg.model, trainer_mesh)
    graphdef, policy = nnx.split(model)
    for mesh in (sampler_mesh, trainer_mesh):
        out, seconds = WeightPush(graphdef, mesh)(policy)
        assert seconds > 0
        for a, b in zip(jax.tree.leaves(policy), jax.tree.leaves(out)):
            assert b.sharding.mesh == mesh and np.array_equal(np.asarray(a), np.asarray(b))
            assert ({s.data.unsafe_buffer_pointer() for s in a.addressable_shards}
                    .isdisjoint(s.data.unsafe_buffer_pointer() for s in b.addressable_shards))
