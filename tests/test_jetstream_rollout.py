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


def test_the_samples_of_a_prompt_share_its_prefill_and_the_cache_is_freed_after(
        backends, monkeypatch):
    """One prefill per prompt (the G requests of a prompt reuse it: the per-sample key is
    applied at insert), none reused across a weight push; the driver's decode state is freed
    after each rollout and made afresh by the next."""
    import jax
    from flax import nnx

    from flowrl_jax.sampling.jetstream_rollout_engine import RolloutEngine

    core, model, rollouts = backends
    calls = []
    real = RolloutEngine._prefill_cache
    monkeypatch.setattr(RolloutEngine, "_prefill_cache",
                        lambda self, *a: calls.append(1) or real(self, *a))
    held = []  # the decode state each rollout leaves in the driver's generate thread
    real_release = RolloutEngine.release
    monkeypatch.setattr(RolloutEngine, "release",
                        lambda self: held.append(jax.tree.leaves(self._held))
                        or real_release(self))
    prompts = [[5, 6, 7]] * 2 + _prompts(2)  # two identical prompts in a row share one too
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=123)
    got = rollouts.generate(model, prompts, sp)
    assert len(calls) == 3
    # the KV cache of the slots is freed after the rollout (the train step needs the memory)
    assert len(held) == 1 and held[0] and all(x.is_deleted() for x in held[0])
    np.testing.assert_array_equal(got.tokens, core.generate(model, prompts, sp).tokens)
    other = jax.tree.map(lambda x: x * 1.5, nnx.state(model))
    got = rollouts.generate(other, prompts, sp)
    assert len(calls) == 6
    np.testing.assert_array_equal(got.tokens, core.generate(other, prompts, sp).tokens)
    # JetStream calls generate until its detokenize thread frees the finished slots: with no
    # slot decoding, a rollout's engine emits nothing and runs no decode
    engine = next(iter(rollouts._drivers.values()))[0]
    idle, decode = engine.init_decode_state(), engine._generate
    engine._generate = None  # a decode would fail
    engine.start_trace()
    try:
        st, result = engine.generate(None, idle)
    finally:
        engine.stop_trace()
        engine._generate = decode
    assert st is idle and not np.asarray(result.data).any()


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


def test_a_failing_driver_is_an_error_naming_the_thread(backends, monkeypatch):
    import time

    from flowrl_jax.sampling.jetstream_rollout import JetStreamRollouts
    from flowrl_jax.sampling.jetstream_rollout_engine import RolloutEngine

    def broken_generate(self, params, decode_state):
        raise RuntimeError("device lost")

    monkeypatch.setattr(RolloutEngine, "generate", broken_generate)
    core, model, _ = backends
    rollouts = JetStreamRollouts(core, timeout_s=300)
    t0 = time.monotonic()
    try:
        with pytest.raises(SamplingError, match=r"the driver failed \(its generate-0 thread failed: "
                                                r"RuntimeError: device lost\)"):
            rollouts.generate(model, _prompts(2), SamplingParams(temperature=1.0, max_new_tokens=4,
                                                                 n=2, seed=1))
        assert time.monotonic() - t0 < 120  # found by the driver check, not the 300 s timeout
        assert not rollouts._drivers
    finally:
        rollouts.close()


# The trainer through JetStream trains exactly as through the engine (every metric but the
# sampler/trainer log-prob gap, and the final params): tests/test_staleness.py's
# test_staleness_zero_is_the_default_trainer_bit_for_bit, on 8 devices.
