"""Sampling engine: greedy parity with HF generate, log-probs vs a full HF forward, sampling
distributions (chi-square), determinism, EOS/stop handling, sharding, input errors."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from flowrl_jax.config import MeshConfig, RolloutConfig
from flowrl_jax.mesh import make_mesh
from flowrl_jax.sampling import cpu_fast_paths
from flowrl_jax.sampling import kernels as kernels_module
from flowrl_jax.sampling.engine import SamplingEngine, SamplingError, SamplingParams
from flowrl_jax.sampling.logits import sample_logits
from flowrl_jax.sampling.params import SamplingSpec
from flowrl_jax.testing import tiny_arch, tiny_model, to_hf

NEW = 32
SPEC = dict(temperature=0.8, top_k=10, top_p=0.9)  # one compiled sampling spec for the engine tests
# Upper 0.1 % points of the chi-square distribution, df = 1..11 (standard table values).
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264}


@pytest.fixture(scope="module")
def setup():
    arch = tiny_arch(128)
    model = tiny_model(arch, seed=0)
    hf = to_hf(model, arch)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 1, 9, 3, 12, 7)]
    return arch, model, hf, prompts


def hf_greedy_tokens(hf, prompts, new: int) -> list[list[int]]:
    """HF transformers greedy generate of `new` tokens on the left-padded batch of prompts."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
    return out[:, width:].tolist()


@pytest.fixture(scope="module")
def hf_greedy(setup):
    """HF greedy tokens for all prompts (NEW new tokens)."""
    _, _, hf, prompts = setup
    return hf_greedy_tokens(hf, prompts, NEW)


@pytest.fixture(scope="module")
def engine(setup):
    """8 slots ≥ 6 requests: every prompt decodes at once."""
    return SamplingEngine(setup[1], decode_slots=8, decode_chunk=16, prefill_buckets=(8, 16),
                          verbose=False)


def _hf_logits(hf, seq: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].double().numpy()


def test_greedy_matches_hf_batch(setup, engine, hf_greedy):
    _, model, _, prompts = setup
    out = engine.generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    assert out.token_lists() == hf_greedy
    assert out.finish_reasons == ["length"] * len(prompts)
    assert len({tuple(t) for t in hf_greedy}) == len(prompts)  # the prompts really differ


def test_greedy_matches_hf_continuous_batching(setup, hf_greedy):
    """2 slots for 6 requests, 5-step chunks: slots are refilled between chunks."""
    _, model, _, prompts = setup
    eng = SamplingEngine(model, decode_slots=2, decode_chunk=5, prefill_buckets=(8, 16), verbose=False)
    out = eng.generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    assert out.token_lists() == hf_greedy
    # ragged budgets: the short request frees its slot early and the rest still match
    short = eng.generate(model, prompts[:3], SamplingParams(temperature=0.0, max_new_tokens=7))
    assert short.token_lists() == [t[:7] for t in hf_greedy[:3]]


def test_logprobs_equal_full_forward(setup, engine):
    _, model, hf, prompts = setup
    t, k = SPEC["temperature"], SPEC["top_k"]
    out = engine.generate(model, prompts[:3], SamplingParams(**SPEC, n=2, max_new_tokens=16, seed=3))
    assert list(out.prompt_index) == [0, 0, 1, 1, 2, 2] and list(out.sample_index) == [0, 1] * 3
    for i in range(len(out.lengths)):
        p = prompts[out.prompt_index[i]]
        gen = out.tokens[i, :out.lengths[i]].tolist()
        logits = _hf_logits(hf, p + gen)[len(p) - 1: len(p) - 1 + len(gen)] / t
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        ref = logp[np.arange(len(gen)), gen]
        np.testing.assert_allclose(out.logprobs[i, :len(gen)], ref, atol=1e-4, rtol=0)
        # each sampled token is inside the top-k of the policy at that step
        ranks = (logits > logits[np.arange(len(gen)), gen][:, None]).sum(-1)
        assert (ranks < k).all()


def test_bf16_compute_logprobs_err_no_more_than_the_bf16_forward(setup):
    """Mixed precision (float32 weights, bf16 compute, bf16 KV cache: what accelerators run):
    the engine's log-probs are as close to the float32 model's as the bf16 full forward's,
    so the decode path (weight copies, cache layout, attention) adds no error of its own."""
    from flowrl_jax.models.qwen2 import Numerics

    arch, model32, _, prompts = setup
    model16 = tiny_model(arch, seed=0, num=Numerics(jnp.float32, jnp.bfloat16))
    eng = SamplingEngine(model16, decode_slots=4, decode_chunk=16, prefill_buckets=(16,),
                         verbose=False)
    assert eng.cache_dtype == jnp.bfloat16
    out = eng.generate(model16, prompts[:4], SamplingParams(temperature=1.0, max_new_tokens=16,
                                                            seed=5))
    forward = jax.jit(lambda m, ids: jax.nn.log_softmax(m(ids).logits.astype(jnp.float32), -1))
    err_engine, err_forward = [], []
    # every row right-padded to one length: one compile per model instead of one per row (the
    # causal mask keeps the padding out of the positions read)
    width = max(len(prompts[i]) + int(n) for i, n in enumerate(out.lengths))
    for i, n in enumerate(out.lengths):
        p, gen = prompts[i], out.tokens[i, :n]
        row = p + gen.tolist()
        ids = jnp.asarray([row + [0] * (width - len(row))])
        rows = np.arange(len(p) - 1, len(p) - 1 + n)
        lp32 = np.asarray(forward(model32, ids))[0, rows, gen]
        lp16 = np.asarray(forward(model16, ids))[0, rows, gen]
        err_engine.append(np.abs(out.logprobs[i, :n] - lp32).max())
        err_forward.append(np.abs(lp16 - lp32).max())
    assert max(err_forward) > 0  # bf16 really rounds here
    assert max(err_engine) <= 2 * max(err_forward) + 1e-2, (err_engine, err_forward)


def _ref_dist(logits: np.ndarray, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Truncated, renormalised distribution in float64 (top-k, then top-p, then min-p)."""
    z = logits / t
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    keep = np.ones_like(probs, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1:
        q = np.where(keep, probs, 0)
        q /= q.sum()
        order = np.argsort(-q)
        before = np.cumsum(q[order]) - q[order]
        kp = np.zeros_like(keep)
        kp[order] = before < top_p
        keep &= kp
    if min_p:
        q = np.where(keep, probs, 0)
        keep &= q >= min_p * q.max()
    out = np.where(keep, probs, 0)
    return out / out.sum()


def _chi2(counts: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    n = counts.sum()
    support = expected_p > 0
    assert counts[~support].sum() == 0, "sampled a token outside the truncated support"
    e = expected_p[support] * n
    return float(((counts[support] - e) ** 2 / e).sum()), int(support.sum() - 1)


@pytest.mark.parametrize("t,top_k,top_p,min_p", [
    (1.0, 0, 1.0, 0.0), (0.6, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0), (1.0, 0, 0.7, 0.0),
    (1.0, 0, 1.0, 0.15), (0.8, 6, 0.8, 0.0), (1.3, 5, 0.9, 0.1)])
def test_sampling_distribution_chi_square(t, top_k, top_p, min_p):
    v, n = 12, 6000
    logits = np.random.default_rng(0).normal(0, 1.5, v).astype(np.float32)
    keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(42), n))
    spec = SamplingSpec(t, top_p, top_k, min_p)
    tok, logp = jax.jit(lambda l, k: sample_logits(l, k, spec))(jnp.tile(logits, (n, 1)), keys)
    counts = np.bincount(np.asarray(tok), minlength=v)
    expected = _ref_dist(logits.astype(np.float64), t, top_k, top_p, min_p)
    stat, df = _chi2(counts, expected)
    assert stat < CHI2_999[df], (stat, df, counts, expected)
    # log-probs are the untruncated log_softmax(logits / T) of the sampled token
    full = logits / t - np.logaddexp.reduce(logits.astype(np.float64) / t)
    np.testing.assert_allclose(np.asarray(logp), full[np.asarray(tok)], atol=1e-5)
    if (top_k, top_p, min_p) != (0, 1.0, 0.0):  # the test has power: untruncated is rejected
        untrunc = _ref_dist(logits.astype(np.float64), t, 0, 1.0, 0.0)
        bad = ((counts - untrunc * n) ** 2 / (untrunc * n)).sum()
        assert bad > CHI2_999[v - 1]


def test_engine_first_token_distribution(setup, engine):
    """End to end: first tokens of 2048 samples of one prompt follow the truncated policy
    (8 slots: 256 rounds of admission, so also per-sample keys across refills)."""
    _, model, hf, prompts = setup
    out = engine.generate(model, [prompts[3]], SamplingParams(**SPEC, n=2048, max_new_tokens=1,
                                                              seed=11))
    counts = np.bincount(out.tokens[:, 0], minlength=128)
    expected = _ref_dist(_hf_logits(hf, prompts[3])[-1], SPEC["temperature"], SPEC["top_k"],
                         SPEC["top_p"], 0.0)
    stat, df = _chi2(counts, expected)
    assert df >= 1 and stat < CHI2_999[df], (stat, df)


def test_same_seed_same_samples_any_slots(setup, engine):
    _, model, _, prompts = setup
    sp = SamplingParams(**SPEC, n=3, max_new_tokens=12, seed=5)
    a = engine.generate(model, prompts[:3], sp)
    small = SamplingEngine(model, decode_slots=2, decode_chunk=3, prefill_buckets=(8, 16), verbose=False)
    b = small.generate(model, prompts[:3], sp)
    assert a.token_lists() == b.token_lists()
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    c = engine.generate(model, prompts[:3], SamplingParams(**SPEC, n=3, max_new_tokens=12, seed=6))
    assert c.token_lists() != a.token_lists()
    assert len({tuple(x) for x in a.token_lists()[:3]}) > 1  # the G samples of a prompt differ


def test_eos_and_stop_ids(setup, hf_greedy):
    """EOS (engine-level) and stop_token_ids end a sample at that token; ignore_eos does not.
    All prompts are sent so the batch shape (and compiled code) is the one of the other tests."""
    _, model, _, prompts = setup
    ref = hf_greedy[0]
    j = next(i for i in range(2, NEW) if ref[i] not in ref[:i])
    x = ref[j]
    eng = SamplingEngine(model, decode_slots=8, decode_chunk=16, prefill_buckets=(8, 16),
                         eos_token_ids=(x,), verbose=False)

    def first(**kw):
        out = eng.generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW, **kw))
        return out.token_lists()[0], out.finish_reasons[0], out

    toks, reason, out = first()
    assert toks == ref[:j + 1] and reason == "stop"
    for i, t in enumerate(out.token_lists()):  # every sample stops at its first x, or runs out
        assert t == (hf_greedy[i][:hf_greedy[i].index(x) + 1] if x in hf_greedy[i] else hf_greedy[i])
    toks, reason, _ = first(ignore_eos=True)
    assert toks == ref and reason == "length"
    toks, reason, out = first(ignore_eos=True, stop_token_ids=(ref[1],))
    assert toks == ref[:2] and reason == "stop"
    assert out.lengths[0] == 2 and out.tokens[0, 2:].sum() == 0


def test_sharded_mesh_matches_single_device(setup, hf_greedy):
    _, model, _, prompts = setup
    assert len(jax.devices()) >= 8
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    eng = SamplingEngine(model, mesh=mesh, decode_slots=8, decode_chunk=16, prefill_buckets=(8, 16),
                         verbose=False)
    from flax import nnx

    params = eng.params_of(model)  # resharded: the model lives on one device
    assert params is not nnx.state(model)
    assert eng.params_of(params) is params  # already on the engine's mesh: used as is
    st = eng.init_state(8, 48)  # the paged engine: pools [pages, kv_heads, head_dim, page]
    # pages in one block per slot shard (test_paged_sharded.py), kv heads over tensor
    assert st.pool[0].k.sharding.spec[:2] == (("data", "fsdp"), "tensor")
    assert st.pool[0].v.sharding.spec[:2] == (("data", "fsdp"), "tensor")
    assert st.page_table.sharding.spec[0] == ("data", "fsdp")  # per slot, as the dense rows
    out = eng.generate(params, prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    assert out.token_lists() == hf_greedy


def test_long_prompts_prefill_through_the_no_cache_kernels_and_match_hf(setup):
    """Prompts longer than the flash block prefill through the model's no-cache flash path
    (no [P, P] scores), next to a one-token prompt (empty prefix): HF's greedy tokens. The
    same through the fused-kernel path GPUs take (`attention: cudnn`; XLA's kernel on CPU)."""
    from flowrl_jax.models.attention import FLASH_BLOCK
    from flowrl_jax.models.qwen2 import Numerics

    arch, model, hf, _ = setup
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (150, FLASH_BLOCK + 6, 1)]
    ref = hf_greedy_tokens(hf, prompts, 6)
    fused = tiny_model(arch, seed=0, num=Numerics(attention="cudnn"))
    for m in (model, fused):
        eng = SamplingEngine(m, decode_slots=4, decode_chunk=6, prefill_buckets=(160,),
                             verbose=False)
        out = eng.generate(m, prompts, SamplingParams(temperature=0.0, max_new_tokens=6))
        assert out.token_lists() == ref, m.num.attention


def test_dense_long_decode_matches_hf(setup):
    """The dense reference over long generations: greedy tokens over 80 steps from ragged
    prompts equal HF's with all prompts in flight, with slots refilled between chunks, and
    on a mesh. (Its decode reads the whole cache row at every step, like the paged engine's
    gathered pages: no attention windows.)"""
    _, model, hf, prompts = setup
    new = 80
    ref = hf_greedy_tokens(hf, prompts, new)
    sp = SamplingParams(temperature=0.0, max_new_tokens=new)
    eng = SamplingEngine(model, decode_slots=8, decode_chunk=40, prefill_buckets=(8, 16),
                         verbose=False, kv_cache="dense")
    assert eng.generate(model, prompts, sp).token_lists() == ref
    few = SamplingEngine(model, decode_slots=2, decode_chunk=9, prefill_buckets=(8, 16),
                         verbose=False, kv_cache="dense")
    assert few.generate(model, prompts, sp).token_lists() == ref
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    sharded = SamplingEngine(model, mesh=mesh, decode_slots=8, decode_chunk=40,
                             prefill_buckets=(8, 16), verbose=False,
                             kv_cache="dense")
    assert sharded.generate(sharded.params_of(model), prompts, sp).token_lists() == ref


def test_rollout_config_and_errors(setup, engine):
    arch, model, _, prompts = setup
    sp = SamplingParams.from_rollout_config(RolloutConfig(samples_per_prompt=4, temperature=0.9,
                                                          top_p=0.95, max_new_tokens=64), seed=7)
    assert (sp.n, sp.temperature, sp.top_p, sp.max_new_tokens, sp.seed) == (4, 0.9, 0.95, 64, 7)
    with pytest.raises(SamplingError, match="prompt 1.*max_position_embeddings"):
        engine.generate(model, [[5], list(range(3, 100))],
                        SamplingParams(max_new_tokens=arch.max_position_embeddings - 50))
    with pytest.raises(SamplingError, match="prompt 1: token id 300"):
        engine.generate(model, [[5], [4, 300]], SamplingParams(max_new_tokens=4))
    with pytest.raises(SamplingError, match="prompt 0 is empty"):
        engine.generate(model, [[]], SamplingParams(max_new_tokens=4))
    with pytest.raises(SamplingError, match="top_p"):
        engine.generate(model, [[5]], SamplingParams(top_p=0.0))


def test_unrolled_threefry_matches_jax_random():
    """The sampler's hand-written fold_in / categorical must equal jax.random bit for bit
    (a jax upgrade that changes either would silently change every sampled token)."""
    from flowrl_jax.sampling.random import (categorical_rows, fast_threefry, fold_in_rows,
                                            gumbel_noise)

    assert fast_threefry(), "jax's default PRNG config changed: the sampler falls back"
    base = jax.random.split(jax.random.PRNGKey(7), 4096)
    raw = jax.random.key_data(base) if jnp.issubdtype(base.dtype, jax.dtypes.prng_key) else base
    data = jnp.arange(4096, dtype=jnp.uint32) * 7919
    expect = jax.vmap(jax.random.fold_in)(raw, data)
    np.testing.assert_array_equal(np.asarray(fold_in_rows(raw, data)), np.asarray(expect))
    for vocab in (12, 128, 1000):
        logits = jax.random.normal(jax.random.PRNGKey(vocab), (4096, vocab))
        ref = jax.vmap(jax.random.categorical)(raw, logits)
        np.testing.assert_array_equal(np.asarray(categorical_rows(raw, logits)), np.asarray(ref))
        # the same draws from noise made beforehand for [steps, rows] keys at once
        noise = gumbel_noise(raw.reshape(64, 64, 2), vocab).reshape(4096, vocab)
        np.testing.assert_array_equal(np.asarray(categorical_rows(None, logits, noise)), np.asarray(ref))
    folded = fold_in_rows(raw.reshape(64, 64, 2), data.reshape(64, 64))
    np.testing.assert_array_equal(np.asarray(folded).reshape(4096, 2), np.asarray(expect))


def test_sample_keys_equal_jax_random_fold_ins():
    """Per-sample base keys are fold_in(fold_in(PRNGKey(seed), prompt), sample) exactly,
    also for seeds past 2**31 (the unrolled path builds PRNGKey's [0, seed] itself)."""
    from flowrl_jax.sampling.random import sample_keys

    p = jnp.arange(40, dtype=jnp.int32) * 7 + 3
    s = jnp.arange(40, dtype=jnp.int32) % 5
    for seed in (0, 12345, 2**31 + 5, 2**32 - 1):
        def one(pi, si, seed=seed):
            k = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(np.uint32(seed)), pi), si)
            return jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k
        expect = jax.vmap(one)(p, s).astype(jnp.uint32)
        got = jax.jit(sample_keys)(np.uint32(seed), p, s)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expect), err_msg=f"seed {seed}")


def test_decode_matrices_are_the_transposed_weights_within_the_size_limit(setup, monkeypatch):
    """CPU decode multiplies by [in, out] copies: each equals its weight transposed (the head:
    the tied embedding's), in layer order; below the slot or step limits or over the byte
    limit there are none."""
    _, model, _, _ = setup
    mats = jax.jit(cpu_fast_paths.decode_matrices, static_argnums=(1, 2))(model, 4, 16)
    lyr = model.layers[1]
    for got, lin in zip(mats.layers[1], (lyr.self_attn.q_proj, lyr.self_attn.k_proj,
                                          lyr.self_attn.v_proj, lyr.self_attn.o_proj,
                                          lyr.mlp.gate_proj, lyr.mlp.up_proj, lyr.mlp.down_proj)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(lin.weight[...]).T)
    np.testing.assert_array_equal(np.asarray(mats.head), np.asarray(model.embed_tokens[...]).T)
    assert cpu_fast_paths.decode_matrices(model, 3, 16) is None  # few rows: matrix-vector products
    assert cpu_fast_paths.decode_matrices(model, 4, 15) is None  # few steps to pay for the copy
    monkeypatch.setattr(cpu_fast_paths, "LIMITS", replace(cpu_fast_paths.LIMITS,
                                                          transpose_max_bytes=mats.head.nbytes))
    assert cpu_fast_paths.decode_matrices(model, 4, 16) is None


def test_decode_attention_products_agree_with_a_float64_softmax():
    """The CPU (elementwise) and accelerator (matmul) forms of the decode attention are the
    same function: both against float64 NumPy, GQA 3 query heads per KV head, some slots
    not yet visible."""
    from flowrl_jax.models.decode import decode_attention

    rng = np.random.default_rng(7)
    b, kh, g, d, s = 3, 2, 3, 8, 11
    q = rng.normal(size=(b, kh, g, d))
    k = rng.normal(size=(b, kh, d, s))
    v = rng.normal(size=(b, kh, d, s))
    visible = np.arange(s)[None, :] <= np.array([2, 7, 10])[:, None]
    sc = np.einsum("bkgd,bkds->bkgs", q, k) / np.sqrt(d)
    sc = np.where(visible[:, None, None, :], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    ref = np.einsum("bkgs,bkds->bkgd", p / p.sum(-1, keepdims=True), v)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [jnp.asarray(visible)[:, None, None, :]]
    for products in ("elementwise", "matmul"):
        with jax.default_matmul_precision("highest"):
            out = jax.jit(decode_attention, static_argnums=4)(*args, products)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, err_msg=products)
    with pytest.raises(ValueError, match="'dense'"):
        decode_attention(*args, "dense")


def test_greedy_matches_hf_on_the_accelerator_path(setup, hf_greedy, monkeypatch):
    """With the CPU fast paths switched off, the engine runs what GPUs and TPUs run (matmul
    decode attention, the weights in the model's own layout, one decode loop): HF's greedy
    tokens. Slot and chunk counts no other test uses, so this traces afresh."""
    seen = []
    monkeypatch.setattr(cpu_fast_paths, "enabled", lambda device: seen.append(device) or False)
    real = cpu_fast_paths.decode_matrices
    monkeypatch.setattr(cpu_fast_paths, "decode_matrices",
                        lambda *a: pytest.fail("weight copies made with the switch off") or real(*a))
    _, model, _, prompts = setup
    eng = SamplingEngine(model, decode_slots=7, decode_chunk=11, prefill_buckets=(8, 16),
                         verbose=False)
    assert eng.decode_groups(32, 64) == 1
    out = eng.generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=NEW))
    assert out.token_lists() == hf_greedy
    assert seen and all(d == jax.devices()[0] for d in seen)


def test_decode_groups_by_platform_size_slots_and_steps(setup, monkeypatch):
    """Parallel decode groups: one per core on a single CPU device, only for models whose
    matmul weights fit the limit, with enough slots per group and enough new tokens."""
    _, model, _, _ = setup
    monkeypatch.setattr(cpu_fast_paths, "host_cores", lambda: 2)
    eng = SamplingEngine(model, decode_slots=32, verbose=False)
    steps = cpu_fast_paths.LIMITS.group_min_steps
    a = model.arch
    d = a.resolved_head_dim
    weights = (a.num_hidden_layers * (a.hidden_size * d * 2 * (a.num_attention_heads + a.num_key_value_heads)
                                      + 3 * a.hidden_size * a.intermediate_size)
               + a.hidden_size * a.vocab_size) * 4  # float32
    assert eng.weight_bytes == weights
    least = cpu_fast_paths.LIMITS.group_min_slots
    assert eng.decode_groups(32, steps) == 2
    assert eng.decode_groups(2 * least, steps) == 2
    assert eng.decode_groups(2 * least - 1, steps) == 1  # a second group would be too small
    assert eng.decode_groups(32, steps - 1) == 1  # too short to pay for the threads
    monkeypatch.setattr(cpu_fast_paths, "host_cores", lambda: 8)
    assert eng.decode_groups(32, steps) == min(8, 32 // least)
    assert eng.decode_groups(3 * least, steps) == 3
    limits = cpu_fast_paths.LIMITS
    monkeypatch.setattr(cpu_fast_paths, "LIMITS", replace(limits, groups_max_weight_bytes=weights - 1))
    assert eng.decode_groups(32, steps) == 1  # the dots would already use every core
    monkeypatch.setattr(cpu_fast_paths, "LIMITS", replace(limits, groups_max_weight_bytes=weights))
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1), jax.devices()[:2])
    assert SamplingEngine(model, mesh=mesh, verbose=False).decode_groups(32, steps) == 1
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    assert SamplingEngine(model, mesh=one, verbose=False).decode_groups(32, steps) == min(8, 32 // least)


@pytest.mark.parametrize("cores", [2, 3])
def test_decode_groups_give_the_samples_of_one_loop(setup, engine, monkeypatch, cores):
    """Split over 2 or 3 threaded groups (2 and 3 slots each, so slots are refilled within a
    group), the samples, log-probs, lengths and finish reasons equal one loop's."""
    _, model, _, prompts = setup
    sp = SamplingParams(**SPEC, n=3, max_new_tokens=12, seed=5, stop_token_ids=(7, 9))
    one = engine.generate(model, prompts[:4], sp)
    monkeypatch.setattr(cpu_fast_paths, "host_cores", lambda: cores)
    monkeypatch.setattr(cpu_fast_paths, "LIMITS", replace(cpu_fast_paths.LIMITS, group_min_slots=2,
                                                          group_min_steps=1))
    eng = SamplingEngine(model, decode_slots=8 if cores == 2 else 6, decode_chunk=5,
                         prefill_buckets=(8, 16), verbose=False,
                         kv_cache="dense")
    calls = []
    real = eng._decode_items
    monkeypatch.setattr(eng, "_decode_items", lambda *a: calls.append((len(a[2]), a[4])) or real(*a))
    out = eng.generate(model, prompts[:4], sp)
    assert sorted(calls) == sorted([(4, 2), (4, 2), (4, 2)] if cores == 3 else [(6, 4), (6, 4)])
    assert out.token_lists() == one.token_lists()
    np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-5)
    assert out.finish_reasons == one.finish_reasons and "stop" in out.finish_reasons
    assert list(out.prompt_index) == list(one.prompt_index)


def test_a_failing_decode_group_raises_after_every_group_stops(setup, monkeypatch):
    _, model, _, prompts = setup
    monkeypatch.setattr(cpu_fast_paths, "host_cores", lambda: 2)
    monkeypatch.setattr(cpu_fast_paths, "LIMITS", replace(cpu_fast_paths.LIMITS, group_min_slots=2,
                                                          group_min_steps=1))
    eng = SamplingEngine(model, decode_slots=8, decode_chunk=5, prefill_buckets=(8, 16),
                         verbose=False, kv_cache="dense")
    finished = []
    real = eng._decode_items

    def items(params, prompts_, queue, *rest):
        if queue[0][0] != 0:
            raise RuntimeError("group failed")
        real(params, prompts_, queue, *rest)
        finished.append(queue)

    monkeypatch.setattr(eng, "_decode_items", items)
    with pytest.raises(RuntimeError, match="group failed"):
        eng.generate(model, prompts[:4], SamplingParams(**SPEC, n=3, max_new_tokens=12, seed=5))
    assert len(finished) == 1  # the caller's group ran to its end before the error surfaced


def test_chunk_noise_made_before_the_loop_gives_the_tokens_drawn_step_by_step(setup, monkeypatch):
    """Small vocabularies draw a chunk's Gumbel noise before its loop: the same tokens and
    log-probs as drawing per step, also for slots carried over from an earlier chunk (5-step
    chunks, 12 tokens) and under top-k/top-p; greedy makes none."""
    _, model, _, prompts = setup
    sp = SamplingParams(**SPEC, n=3, max_new_tokens=12, seed=11)
    eng = SamplingEngine(model, decode_slots=4, decode_chunk=5, prefill_buckets=(8, 16),
                         verbose=False, kv_cache="dense")
    st = eng.init_state(4, 32)

    def noise(spec):
        return cpu_fast_paths.chunk_noise(st.keys, st.generated, spec, 5, 128)

    assert noise(eng.spec_for(sp)).shape == (5, 4, 128)
    assert noise(SamplingSpec(0.0, 1.0, 0, 0.0)) is None
    before = eng.generate(model, prompts[:3], sp)
    monkeypatch.setattr(cpu_fast_paths, "LIMITS", replace(cpu_fast_paths.LIMITS,
                                                          noise_max_bytes=5 * 4 * 128 * 4 - 1))
    assert noise(eng.spec_for(sp)) is None
    monkeypatch.setattr(kernels_module, "_KERNELS", {})  # recompile with per-step draws
    eng = SamplingEngine(model, decode_slots=4, decode_chunk=5, prefill_buckets=(8, 16),
                         verbose=False, kv_cache="dense")
    per_step = eng.generate(model, prompts[:3], sp)
    assert before.token_lists() == per_step.token_lists()
    np.testing.assert_array_equal(before.logprobs, per_step.logprobs)
    assert len({tuple(t) for t in before.token_lists()}) > 3  # really sampled


def test_static_shapes_bucket_and_pow2():
    """`kernels.bucket` (prefill lengths, JetStream buckets): the smallest fitting bucket,
    beyond the largest its next multiple; `pow2` rounds slot counts up."""
    from flowrl_jax.sampling.kernels import bucket, pow2

    assert bucket(1, (16, 8)) == 8 and bucket(8, (8, 16)) == 8 and bucket(9, (8, 16)) == 16
    assert bucket(17, (8, 16)) == 32 and bucket(33, (16,)) == 48
    assert [pow2(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_cpu_fast_paths_switch_by_platform():
    """One switch: CPU devices take the fast paths, others the plain accelerator path."""

    class Device:
        def __init__(self, platform):
            self.platform = platform

    assert cpu_fast_paths.enabled(jax.devices()[0])  # the tests run on CPU devices
    assert [cpu_fast_paths.enabled(Device(p)) for p in ("cpu", "gpu", "tpu")] == [True, False, False]
