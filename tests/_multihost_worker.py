"""One process of the 2-process checkpoint test (run by test_checkpoint_multihost.py)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main(pid: int, port: int, hf_dir: str, out: str) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.experimental import multihost_utils

    from flowrl_jax.checkpoint import hf, orbax
    from flowrl_jax.config import MeshConfig
    from flowrl_jax.mesh import make_mesh

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    model, arch = hf.load_hf(hf_dir, mesh)
    q = model.layers.stacked.self_attn.q_proj.weight.get_value()  # scanned: the default
    assert not q.is_fully_addressable and len(q.addressable_shards) == 2
    hf.export_hf(model, arch, f"{out}/hf", shard_size="100KB")
    orbax.save_policy(f"{out}/ckpt", model, arch, step=2)
    restored, _ = orbax.restore_policy(f"{out}/ckpt", mesh)
    a = multihost_utils.process_allgather(restored.embed_tokens.get_value(), tiled=True)
    b = multihost_utils.process_allgather(model.embed_tokens.get_value(), tiled=True)
    assert (a == b).all()
    multihost_utils.sync_global_devices("done")
    print(f"process {pid} ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
