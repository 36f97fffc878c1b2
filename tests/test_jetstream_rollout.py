"""Rollouts through an in-process JetStream driver give the sampling engine's samples for
the same seeds (per-sample keys), with per-request settings; a stalled rollout is an error."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jetstream", reason="google-jetstream is installed by `make venv` (serve extra)")

from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams  # noqa: E402
from flowrl_jax.sampling.params import SamplingError  # noqa: E402
from flowrl_jax.testing import tiny_arch, tiny_model  # noqa: E402

EOS = 1


@pytest.fixture(scope="module")
def backends():
    from flowrl_jax.sampling.jetstream_rollout import JetStreamRollouts

    arch = tiny_arch(64, eos_token_id=EOS)
    model = tiny_model(arch, seed=2)
    core = SamplingEngine(model, decode_slots=16, decode_chunk=8, prefill_buckets=(8,),
                          verbose=False)
    rollouts = JetStreamRollouts(core, timeout_s=120)
    try:
        yield core, model, rollouts
    finally:
        rollouts.close()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 64, rng.integers(2, 9)).tolist() for _ in range(n)]


@pytest.mark.parametrize("settings", [  # per-request settings: each gets its driver
    dict(temperature=1.0, max_new_tokens=8, n=4, seed=123),
    dict(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, n=4, seed=7),
])
def test_same_samples_as_the_engine(backends, settings):
    core, model, rollouts = backends
    prompts = _prompts(4)
    sp = SamplingParams(**settings)
    a, b = core.generate(model, prompts, sp), rollouts.generate(model, prompts, sp)
    np.testing.assert_array_equal(b.prompt_index, a.prompt_index)
    np.testing.assert_array_equal(b.sample_index, a.sample_index)
    np.testing.assert_array_equal(b.lengths, a.lengths)
    np.testing.assert_array_equal(b.tokens, a.tokens)  # the stop token included
    assert b.finish_reasons == a.finish_reasons
    # other cache/prefill shapes than the engine's decode groups: equal up to rounding
    np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4)


def test_a_different_seed_gives_different_samples_on_both(backends):
    core, model, rollouts = backends
    prompts = _prompts(4)
    base = dict(temperature=1.0, max_new_tokens=8, n=4)
    a = rollouts.generate(model, prompts, SamplingParams(seed=123, **base))
    b = rollouts.generate(model, prompts, SamplingParams(seed=124, **base))
    assert not np.array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(b.tokens, core.generate(model, prompts,
                                                          SamplingParams(seed=124, **base)).tokens)


def test_pushed_params_are_used(backends):
    import jax

    core, model, rollouts = backends
    from flax import nnx

    other = jax.tree.map(lambda x: x * 1.5, nnx.state(model))
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=5)
    prompts = _prompts(4)
    want = core.generate(other, prompts, sp)
    got = rollouts.generate(other, prompts, sp)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert not np.array_equal(got.tokens, core.generate(model, prompts, sp).tokens)


def test_a_stalled_rollout_is_an_error_not_a_hang(backends):
    from flowrl_jax.sampling.jetstream_rollout import JetStreamRollouts

    core, model, _ = backends
    rollouts = JetStreamRollouts(core, timeout_s=1e-3)
    try:
        with pytest.raises(SamplingError, match=r"not complete after 0\.001 s .*rollout\.timeout_s"):
            rollouts.generate(model, _prompts(8), SamplingParams(temperature=1.0, max_new_tokens=8,
                                                                 n=4, seed=1))
        assert not rollouts._drivers  # the stalled driver was stopped, not reused
    finally:
        rollouts.close()


@pytest.mark.slow
def test_trainer_through_jetstream_trains_exactly_like_through_the_engine(tmp_path):
    """Same tokens → same rewards, log-probs, updates: every metric but the sampler/trainer
    log-prob gap (the sampler's log-probs differ by rounding) and the final params equal."""
    import jax
    from trainer_toy import VOLATILE, ToyTask, toy_overrides

    from flowrl_jax.config import load_config
    from flowrl_jax.mesh import single_device_mesh
    from flowrl_jax.rl.trainer import Trainer

    def run(backend: str):
        cfg = load_config(None, toy_overrides("flowrl", 2, **{
            "rollout.backend": backend, "trainer.checkpoint_every": 100}))
        res = Trainer(cfg, tmp_path / backend, task=ToyTask(), console=False,
                      mesh=single_device_mesh()).run()
        hist = [{k: v for k, v in r.items()
                 if not k.startswith(VOLATILE) and k != "rollout/logp_abs_diff"}
                for r in res.history]
        return hist, jax.tree.leaves(jax.device_get(res.state.params))

    (h_js, p_js), (h_eng, p_eng) = run("jetstream"), run("engine")
    assert h_js == h_eng and len(h_eng) == 2
    assert len(p_js) == len(p_eng) > 10
    for a, b in zip(p_js, p_eng):
        np.testing.assert_array_equal(a, b)
