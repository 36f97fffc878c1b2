"""The wire format of the rollout-server methods `serve` adds beside JetStream's gRPC service
(`flowrl.Rollouts/Info`, `/Generate`, `/LoadWeights`; sampling/rollout_server.py serves them,
sampling/remote_rollouts.py calls them).

A message is one `.npz` archive (NumPy's documented format, no pickles): its arrays, plus a
JSON object of the scalar fields under the name `json`. The methods are registered as generic
gRPC handlers on bytes, so no generated protobuf code is needed and JetStream's own
`Decode`/`HealthCheck` stay exactly as they are.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence

import numpy as np

from flowrl_jax.sampling.params import SamplingParams

SERVICE = "flowrl.Rollouts"
INFO, GENERATE, LOAD_WEIGHTS = "Info", "Generate", "LoadWeights"
#: largest message either side accepts (a rollout of 256 samples × 8192 tokens is ≈ 17 MB)
MAX_MESSAGE_BYTES = 1 << 30


def method(name: str) -> str:
    """The full gRPC method path of one rollout method."""
    return f"/{SERVICE}/{name}"


def pack(fields: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> bytes:
    """One message: JSON-able `fields` and named arrays."""
    buf = io.BytesIO()
    data = {k: np.asarray(v) for k, v in (arrays or {}).items()}
    data["json"] = np.frombuffer(json.dumps(dict(fields)).encode(), np.uint8)
    np.savez(buf, **data)
    return buf.getvalue()


def unpack(message: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(fields, arrays) of a message; ValueError when it is not one."""
    try:
        with np.load(io.BytesIO(message), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        fields = json.loads(arrays.pop("json").tobytes().decode())
    except Exception as e:  # noqa: BLE001 - any malformed message is one error
        raise ValueError(f"not a rollout message ({type(e).__name__}: {e})") from e
    if not isinstance(fields, dict):
        raise ValueError("not a rollout message (fields are not a JSON object)")
    return fields, arrays


def settings_fields(sampling: SamplingParams, stop_ids: Sequence[int]) -> dict[str, Any]:
    """A Generate request's sampling settings, with the client's explicit stop ids."""
    return {"temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k, "min_p": sampling.min_p,
            "max_new_tokens": sampling.max_new_tokens, "n": sampling.n,
            "seed": sampling.seed, "stop_token_ids": [int(t) for t in stop_ids]}


def sampling_of(settings: Mapping[str, Any]) -> SamplingParams:
    """The SamplingParams of `settings_fields`' dict: the client's stop ids only (the server's
    own EOS set adds none); KeyError/TypeError/ValueError when malformed."""
    return SamplingParams(temperature=float(settings["temperature"]),
                          top_p=float(settings["top_p"]), top_k=int(settings["top_k"]),
                          min_p=float(settings["min_p"]),
                          max_new_tokens=int(settings["max_new_tokens"]), n=int(settings["n"]),
                          seed=int(settings["seed"]), ignore_eos=True,
                          stop_token_ids=tuple(int(t) for t in settings["stop_token_ids"]))
