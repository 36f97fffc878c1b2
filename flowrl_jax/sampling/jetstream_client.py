"""A client of the JetStream gRPC server (jetstream_server.py, `flowrl-jax serve`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from flowrl_jax.sampling.completions import SAMPLING_METADATA_KEY
from flowrl_jax.sampling.jetstream import js


@dataclass
class Completion:
    """One server response: generated token ids and text."""

    token_ids: list[int]
    text: str


def request_samples(address: str, *, text: Optional[str] = None,
                    token_ids: Optional[list[int]] = None, max_tokens: int = 64,
                    timeout: float = 60.0, sampling: Optional[dict] = None) -> list[Completion]:
    """Send one Decode request to a JetStream server at HOST:PORT; one Completion per sample.
    `sampling` (OpenAI field names: temperature, top_p, top_k, min_p, n, seed, stop…) travels
    as `x-flowrl-sampling` metadata; without it the server's settings apply."""
    import grpc

    if (text is None) == (token_ids is None):
        raise ValueError("give exactly one of text= or token_ids=")
    pb = js.jetstream_pb2
    if text is not None:
        req = pb.DecodeRequest(text_content=pb.DecodeRequest.TextContent(text=text),
                               max_tokens=max_tokens)
    else:
        req = pb.DecodeRequest(token_content=pb.DecodeRequest.TokenContent(token_ids=token_ids),
                               max_tokens=max_tokens)
    metadata = ((SAMPLING_METADATA_KEY, json.dumps(sampling)),) if sampling else None
    samples: list[tuple[list[int], list[str]]] = []
    with grpc.insecure_channel(address) as channel:
        stub = js.jetstream_pb2_grpc.OrchestratorStub(channel)
        for resp in stub.Decode(req, timeout=timeout, metadata=metadata):
            for i, s in enumerate(resp.stream_content.samples):
                while len(samples) <= i:
                    samples.append(([], []))
                samples[i][0].extend(s.token_ids)
                samples[i][1].append(s.text)
    return [Completion(ids, "".join(parts)) for ids, parts in samples] or [Completion([], "")]


def request(address: str, *, text: Optional[str] = None, token_ids: Optional[list[int]] = None,
            max_tokens: int = 64, timeout: float = 60.0,
            sampling: Optional[dict] = None) -> Completion:
    """Send one Decode request to a JetStream server at HOST:PORT and collect the stream (one
    sample; see `request_samples` for n > 1)."""
    return request_samples(address, text=text, token_ids=token_ids, max_tokens=max_tokens,
                           timeout=timeout, sampling=sampling)[0]
