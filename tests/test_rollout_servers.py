"""Disaggregated rollouts (`rollout.servers`): `flowrl-jax serve` subprocesses (tiny model,
port 0, started once for the module) sample the trainer's rollouts with the trainer's pushed
weights. The samples equal the in-process engine's (same tokens, log-probs within float
tolerance: the server's engine has other slot/chunk/bucket shapes), the weight push is
observable (the server's version advances and its samples change), and a server that dies or
hangs is detected within rollout.timeout_s, named, and its prompts retried on the others —
or the run stops with a SamplingError and its last checkpoint intact."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from flax import nnx  # noqa: E402
from trainer_toy import ROOT, ToyTask, checkpoint_arrays, toy_overrides, train_env  # noqa: E402

from flowrl_jax.checkpoint.hf import export_hf  # noqa: E402
from flowrl_jax.config import ConfigError, MeshConfig, load_config  # noqa: E402
from flowrl_jax.errors import SamplingError  # noqa: E402
from flowrl_jax.mesh import make_mesh  # noqa: E402
from flowrl_jax.rl.server_weights import ServerWeights  # noqa: E402
from flowrl_jax.rl.trainer import Trainer  # noqa: E402
from flowrl_jax.sampling.engine import SamplingEngine, SamplingParams  # noqa: E402
from flowrl_jax.sampling.remote_rollouts import RemoteRollouts  # noqa: E402
from flowrl_jax.sampling.rollout_wire import INFO  # noqa: E402
from flowrl_jax.testing import tiny_arch, tiny_model, word_tokenizer  # noqa: E402

SP = SamplingParams(temperature=1.0, max_new_tokens=8, n=4, seed=11)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [40, 41], [3, 4, 5, 6, 7, 8], [20, 21, 22]]


def _arch():
    return load_config(None, toy_overrides()).model.arch  # the toy runs' `tiny` preset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    word_tokenizer(128).save_pretrained(root / "tok")
    export_hf(tiny_model(_arch(), seed=5), _arch(), root / "model", tokenizer_dir=root / "tok")
    return root / "model"


def _start_serve(model_dir: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flowrl_jax.cli", "serve", "--model", str(model_dir),
           "--port", "0", "--max-new-tokens", "16", "--slots", "16",
           "--max-prefill-length", "16"]
    return subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def _address(proc: subprocess.Popen, log: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+):(\d+)", log.read_text(errors="replace"))
        if m:
            return f"127.0.0.1:{m.group(2)}"
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"serve did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Three `flowrl-jax serve` processes: {address: process} (a test may kill its own)."""
    logs = tmp_path_factory.mktemp("logs")
    procs = [_start_serve(model_dir, logs / f"serve{i}.log") for i in range(3)]
    try:
        deadline = time.monotonic() + 180
        yield {_address(p, logs / f"serve{i}.log", deadline): p for i, p in enumerate(procs)}
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture()
def hung_server():
    """A TCP server that accepts connections and never answers (a hung rollout server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    sock.close()


@pytest.fixture(scope="module")
def local():
    """The in-process reference: an engine and two policies of the served architecture."""
    arch = _arch()
    engine = SamplingEngine(tiny_model(arch, seed=0), decode_slots=16, decode_chunk=8,
                            prefill_buckets=(8,), verbose=False)
    return engine, nnx.state(tiny_model(arch, seed=0)), nnx.state(tiny_model(arch, seed=1))


# --------------------------------------------------------------------------- config, engine


@pytest.mark.parametrize("value,match", [
    ("[localhost]", r"rollout\.servers\[0\]: must be host:port"),
    ("[a:1, 'b:99999']", r"rollout\.servers\[1\]"),
    ("[a:1, a:1]", r"rollout\.servers: lists a server twice"),
])
def test_bad_servers_name_the_key(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, toy_overrides(**{"rollout.servers": value}))
    # the servers replace the in-process sampler, whichever rollout.backend names
    for backend in ("jetstream", "engine"):
        load_config(None, toy_overrides(**{"rollout.servers": "[a:1]",
                                           "rollout.backend": backend}))


def test_engine_prompt_indices_give_the_whole_batch_samples(local):
    """A part of a batch sampled with its prompts' indices equals those rows of the whole."""
    engine, p0, _ = local
    whole = engine.generate(p0, PROMPTS, SP)
    part = engine.generate(p0, PROMPTS[1::2], SP, prompt_indices=[1, 3])
    rows = [p * SP.n + s for p in (1, 3) for s in range(SP.n)]
    np.testing.assert_array_equal(part.tokens, whole.tokens[rows])
    np.testing.assert_allclose(part.logprobs, whole.logprobs[rows], atol=1e-5)
    alone = engine.generate(p0, PROMPTS[1::2], SP)  # indices 0, 1: other keys, other samples
    assert not np.array_equal(alone.tokens, whole.tokens[rows])
    with pytest.raises(SamplingError, match="prompt_indices"):
        engine.generate(p0, PROMPTS[:2], SP, prompt_indices=[0])


# --------------------------------------------------------------------------- the client


def _client(local, addresses, tmp_path, timeout_s=60.0):
    remote = RemoteRollouts(local[0], addresses, timeout_s=timeout_s)
    return remote, ServerWeights(remote, tmp_path, _arch())


def test_remote_samples_equal_the_engine_and_the_push_is_observable(servers, local, tmp_path):
    engine, p0, p1 = local
    a, b = list(servers)[:2]
    remote, push = _client(local, [a, b], tmp_path)
    try:
        remote.check(_arch(), SP.max_new_tokens)
        assert push(p0, 0) > 0
        assert [remote._call(s, INFO, {})[0]["version"] for s in (a, b)] == [0, 0]
        got = remote.generate(None, PROMPTS, SP)
        ref = engine.generate(p0, PROMPTS, SP)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_array_equal(got.lengths, ref.lengths)
        assert got.finish_reasons == ref.finish_reasons
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
        assert push(p0, 0) == 0.0  # the servers hold v0 already: skipped
        # a new version: every server loads it, the samples change to the new params'
        push(p1, 1)
        assert [remote._call(s, INFO, {})[0]["version"] for s in (a, b)] == [1, 1]
        assert sorted(p.name for p in (tmp_path / "rollout_weights").iterdir()) == ["v1"]
        new = remote.generate(None, PROMPTS, SP)
        np.testing.assert_array_equal(new.tokens, engine.generate(p1, PROMPTS, SP).tokens)
        assert not np.array_equal(new.tokens, got.tokens)
    finally:
        remote.close()


def test_other_architecture_is_refused_naming_the_server(servers, local, tmp_path):
    a = list(servers)[0]
    other = tiny_arch(128, bos_token_id=1, eos_token_id=2, intermediate_size=96)
    remote = RemoteRollouts(local[0], [a], timeout_s=60)
    try:
        with pytest.raises(ConfigError, match=rf"server {a} serves another model architecture"
                                              r".*intermediate_size 96 vs 128"):
            remote.check(other, SP.max_new_tokens)
        with pytest.raises(ConfigError, match=rf"server {a} allows at most 16 new tokens"):
            remote.check(_arch(), 64)
        export_hf(tiny_model(other), other, tmp_path / "other")
        with pytest.raises(SamplingError, match=rf"rollout server {a}: LoadWeights failed: "
                                                "INVALID_ARGUMENT: .*architecture differs"):
            remote.load_weights(str(tmp_path / "other"), 7)
    finally:
        remote.close()


def test_hung_server_is_detected_named_and_its_prompts_retried(servers, local, hung_server,
                                                               tmp_path):
    engine, p0, _ = local
    a = list(servers)[0]
    # 8 s: the live server must answer within it even on a loaded machine (3 s failed at
    # load 10); it has compiled these shapes in the warm-up call
    remote, push = _client(local, [a], tmp_path, timeout_s=8.0)
    try:
        push(p0, 0)
        remote.generate(None, PROMPTS, SP)  # warm-up: the retry's shapes, compiled once
        remote.servers.append(hung_server)  # joins after the push: "holds" v0 as far as we know
        remote.live.append(hung_server)
        remote._channels[hung_server] = grpc.insecure_channel(hung_server)
        t0 = time.monotonic()
        got = remote.generate(None, PROMPTS, SP)
        assert time.monotonic() - t0 < 8.0 + 20  # one deadline, then the retry on `a`
        np.testing.assert_array_equal(got.tokens, engine.generate(p0, PROMPTS, SP).tokens)
        assert remote.live == [a]
    finally:
        remote.close()
    # alone, the hung server stops the rollout with an error naming it, within the deadline
    remote, push = _client(local, [hung_server], tmp_path, timeout_s=2.0)
    try:
        t0 = time.monotonic()
        with pytest.raises(SamplingError, match=rf"rollout server {hung_server}: .*"
                                                "DEADLINE_EXCEEDED: no answer within "
                                                r"rollout\.timeout_s = 2 s"):
            push(p0, 0)
        assert time.monotonic() - t0 < 2.0 + 10
    finally:
        remote.close()


# --------------------------------------------------------------------------- the trainer


def _run(tmp, name, servers=(), callbacks=(), steps=2, **extra):
    over = {"rollout.timeout_s": 30, **extra}
    if servers:
        over["rollout.servers"] = "[" + ", ".join(servers) + "]"
    cfg = load_config(None, toy_overrides("flowrl", steps, **over))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tr = Trainer(cfg, tmp / name, task=ToyTask(cfg), console=False, callbacks=callbacks,
                 mesh=mesh)
    return tr, tr.run()


def _stable(history):
    skip = ("time/", "throughput/", "perf/", "rollout/logp_abs_diff")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in history]


@pytest.mark.slow  # two 2-step trainer runs: ≈ 60 s on 2 loaded cores
def test_trainer_on_two_servers_equals_in_process_even_when_one_dies(servers, tmp_path,
                                                                     caplog):
    """2 steps on servers A and B equal the in-process run (params bit for bit: the samples
    are the same tokens; only the sampler log-probs differ, within float tolerance, which
    k = 0 uses for `rollout/logp_abs_diff` only). B dies right after the step-1 push, so
    step 1's share of B is retried on A."""
    a, b = list(servers)[:2]
    _, ref = _run(tmp_path, "local")
    pushes = []
    orig_push = None

    def kill_b_after_push_1(trainer, step, rec):
        nonlocal orig_push
        if orig_push is None:  # wrap once: B dies after the servers loaded version 1
            orig_push = trainer.server_push

            def push(params, version):
                s = orig_push(params, version)
                pushes.append((version, s))
                if version == 1 and servers[b].poll() is None:
                    servers[b].kill()
                    servers[b].wait()
                return s
            trainer.server_push = push

    with caplog.at_level("WARNING"):
        tr, got = _run(tmp_path, "remote", servers=[a, b], callbacks=[kill_b_after_push_1])
    assert _stable(got.history) == _stable(ref.history)
    for r, g in zip(ref.history, got.history):
        assert abs(r["rollout/logp_abs_diff"] - g["rollout/logp_abs_diff"]) < 1e-4
        assert g["time/weight_push"] > 0
    leaves = jax.tree.leaves(jax.device_get(ref.state.params))
    for x, y in zip(leaves, jax.tree.leaves(jax.device_get(got.state.params))):
        np.testing.assert_array_equal(x, y)
    assert pushes[0][0] == 1 and pushes[0][1] > 0  # step 1's push ran (and B died after it)
    assert any(f"rollout server {b}" in r.getMessage() and "dropped" in r.getMessage()
               for r in caplog.records)
    assert tr.sampler.live == [a]


def test_run_stops_with_a_sampling_error_and_its_checkpoint_when_no_server_is_left(
        servers, tmp_path):
    c = list(servers)[2]

    def kill_c(trainer, step, rec):
        if step == 1:
            servers[c].kill()
            servers[c].wait()

    t0 = time.monotonic()
    with pytest.raises(SamplingError, match=rf"no rollout server left: rollout server {c}: "):
        _run(tmp_path, "stop", servers=[c], callbacks=[kill_c], steps=3)
    assert time.monotonic() - t0 < 120
    ckpts = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert ckpts == ["1"]
    assert checkpoint_arrays(tmp_path / "stop", 1)  # complete and restorable


def test_unreachable_server_is_named_before_training(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    addr = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nobody listens there now
    t0 = time.monotonic()
    with pytest.raises(SamplingError, match=rf"rollout\.servers: rollout server {addr}: Info "
                                            "failed: UNAVAILABLE"):
        _run(tmp_path, "unreachable", servers=[addr], steps=1)
    assert time.monotonic() - t0 < 60
