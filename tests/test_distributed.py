"""Two processes with jax.distributed on localhost (2 CPU devices each) run two train steps
of the tiny model and end with the same params as one process with 4 devices and the same
global batch; each host's sampler copy of the params equals the trained params. The worker
half of this file runs in the subprocesses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowrl_jax.distributed import LaunchInfo, detect_launch

HERE = Path(__file__).resolve()


def test_detect_launch_from_environment():
    assert detect_launch({}).kind == "single"
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert detect_launch(env) == LaunchInfo("env", "10.0.0.1:1234", 4, 3)
    assert detect_launch({**env, "JAX_NUM_PROCESSES": "1"}).kind == "single"
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        detect_launch({**env, "JAX_PROCESS_ID": "4"})
    assert detect_launch({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}).kind == "slurm"
    assert detect_launch({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).kind == "single"
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).kind == "tpu"
    assert detect_launch({"TPU_WORKER_HOSTNAMES": "localhost"}).kind == "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from trainer_toy import train_env

    return train_env(devices, **extra)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    cmd = [sys.executable, str(HERE), "worker"]
    procs = [subprocess.Popen(cmd + [str(tmp_path / "two.npz")], env=_env(
        2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)]
    single = subprocess.run(cmd + [str(tmp_path / "one.npz")], env=_env(4),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert single.returncode == 0, single.stdout.decode()[-3000:]
    for o in outs:
        assert "processes=2 devices=4" in o and "sampler params == trained params" in o
    assert "processes=1 devices=4" in single.stdout.decode()
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(two.files) == sorted(one.files) and len(one.files) > 10
    init = np.load(tmp_path / "one.npz.init.npz")
    assert any(not np.array_equal(one[k], init[k]) for k in one.files)  # it trained
    # Cross-process (gloo) and in-process all-reduces sum in different orders, and Adam
    # magnifies float32 rounding on near-zero gradients, so compare with the size of the
    # update in mind: a wrong batch split or sharding changes updates by ~100 %.
    for k in one.files:
        d_one, d_two = one[k] - init[k], two[k] - init[k]
        scale = max(float(np.abs(d_one).max()), 1e-12)
        assert float(np.abs(d_two - d_one).max()) <= 0.01 * scale, k
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_trainer_runs_as_two_processes(tmp_path):
    """The whole loop with 2 processes: each host samples and scores its own prompts, the
    rollouts are gathered, the update runs on the global mesh, one checkpoint is written."""
    sys.path.insert(0, str(HERE.parent))
    from trainer_toy import start_train, toy_overrides

    from flowrl_jax.run_files import read_metrics

    port = _free_port()
    out = tmp_path / "run"
    procs = [start_train(out, toy_overrides("grpo", 2), env=_env(
        1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i)), log=tmp_path / f"p{i}.log") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(600) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2]
    # 4 prompts × 4 samples in total, 2 prompts from each host
    assert recs[0]["throughput/response_tokens"] == pytest.approx(16 * recs[0]["response_length/mean"])
    assert (out / "checkpoints" / "2" / "policy").is_dir()


# --------------------------------------------------------------------------- worker


def _worker(out: str) -> None:
    from flowrl_jax.distributed import maybe_initialize

    maybe_initialize()
    import jax

    sys.path.insert(0, str(HERE.parent))
    from trainer_toy import toy_overrides

    from flowrl_jax.algos import get_algorithm
    from flowrl_jax.config import load_config
    from flowrl_jax.mesh import make_mesh
    from flowrl_jax.checkpoint.load import random_model
    from flowrl_jax.models.qwen2 import Numerics
    from flowrl_jax.rl.rollout_batch import build_rollout_batch, minibatches
    from flowrl_jax.rl.train_state import create_train_state, reference_params
    from flowrl_jax.distributed import HostReplica, to_host
    from flowrl_jax.rl.step_fns import StepFns

    print(f"processes={jax.process_count()} devices={jax.device_count()}", flush=True)
    cfg = load_config(None, toy_overrides("flowrl", 1))
    mesh = make_mesh(cfg.mesh)
    model = random_model(cfg.model.arch, Numerics.from_config(cfg.model), mesh, seed=0)
    state = create_train_state(cfg, model, mesh, rng=0)
    ref = reference_params(state)["policy"]
    fns = StepFns(cfg, get_algorithm("flowrl"), state, mesh)
    init = _flat(to_host(state.params))  # a collective: every process takes part
    if jax.process_index() == 0:
        np.savez(out + ".init.npz", **init)

    # the same global rollout batch on every process: 4 prompts × 4 samples
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, size=int(rng.integers(3, 7))).tolist() for _ in range(4)]
    pidx = np.repeat(np.arange(4), 4)
    lengths = rng.integers(1, 9, size=16)
    tokens = rng.integers(3, 128, size=(16, 8))
    rewards = rng.choice([-1.0, 1.0], size=16)
    data = build_rollout_batch(prompts, pidx, tokens, lengths, rewards, 8, 8)
    data = fns.advantages(fns.logprobs(state, ref, data))
    for mb in minibatches(data, 8, np.random.default_rng(1), (8,), 8):  # two train steps
        state, metrics = fns.update(state, mb)
        assert float(to_host(metrics)["skipped"]) == 0.0
    params = _flat(to_host(state.params))
    if jax.process_index() == 0:
        np.savez(out, **params)
    if jax.process_count() > 1:  # the per-host sampler copy (trainer.sampler_params)
        from flowrl_jax.config import MeshConfig
        replica = HostReplica(make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1),
                                        sorted(jax.local_devices(), key=lambda d: d.id)))
        local = _flat({"policy": replica(state.params["policy"])})
        assert local.keys() <= params.keys() and len(local) > 10  # stacked layers: 14 leaves
        for k, v in local.items():
            np.testing.assert_array_equal(v, params[k], err_msg=k)
        print("sampler params == trained params", flush=True)
    jax.effects_barrier()


def _flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _worker(sys.argv[2])
