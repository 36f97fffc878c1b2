"""Our sampling engine behind JetStream's Engine API (`FlowRLEngine`), and JetStream's driver
with token requests fixed (`FlowRLDriver`); the gRPC server is jetstream_server.py, the
client jetstream_client.py, rollouts jetstream_rollout.py.

JetStream's orchestrator drives `prefill` → `insert(slot)` → one `generate` step per call and
detokenises on its own threads. Prefill computes the cache of `prompt[:-1]`; the first
`generate` after `insert` feeds the last prompt token and samples the first new token (the
same decode kernel as `SamplingEngine.generate`). A slot stops by itself on EOS/stop ids or a
full cache and then reports `valid = False`, which completes the request.

JetStream's driver threads would SIGKILL the process on any exception, so the server validates
requests before they reach the driver (`FlowRLEngine.validate_request`, called by
jetstream_server.py's gRPC handler); prefill/insert additionally clamp their inputs instead of
raising.
"""

from __future__ import annotations

import functools
import itertools
import threading
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from flowrl_jax.sampling.engine import SamplingEngine
from flowrl_jax.sampling.jetstream_compat import import_jetstream
from flowrl_jax.sampling.kernels import DecodeState, bucket
from flowrl_jax.sampling.params import SamplingParams
from flowrl_jax.sampling.random import sample_keys

js = import_jetstream()
engine_api = js.engine_api
Array = jax.Array

# pad_tokens() only accepts a max_prefill_length from this list when it pads token requests.
JETSTREAM_LENGTHS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class HFTokenizer(js.tokenizer_api.Tokenizer):
    """JetStream tokenizer over a Hugging Face tokenizer (no SentencePiece/seqio needed)."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], buckets: tuple[int, ...]):
        self.tokenizer = tokenizer
        self._stop = set(int(t) for t in stop_ids)
        self._buckets = list(buckets)

    def encode(self, s: str, **kwargs: Any) -> tuple[Union[jax.Array, np.ndarray], int]:
        ids = np.asarray(self.tokenizer.encode(s, add_special_tokens=False), np.int32)
        is_bos = bool(kwargs.get("is_bos", True)) and self.tokenizer.bos_token_id is not None
        return js.token_utils.pad_tokens(ids, self.bos_id, self.pad_id, is_bos=is_bos,
                                         prefill_lengths=self._buckets,
                                         max_prefill_length=kwargs.get("max_prefill_length"),
                                         jax_padding=kwargs.get("jax_padding", False))

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    @property
    def stop_tokens(self) -> set[int]:
        return set(self._stop)

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else 0)

    @property
    def eos_id(self) -> int:
        eid = self.tokenizer.eos_token_id
        return int(eid if eid is not None else -1)

    @property
    def bos_id(self) -> int:
        bid = self.tokenizer.bos_token_id
        return int(bid if bid is not None else self.pad_id)


@functools.lru_cache(maxsize=None)
def _insert_rows_fn(kernels: Any) -> Any:
    """Jitted: start M requests of one prefix in slots `dst` (out of range = padding), each
    with the key (seed, prompt index, sample index); `seed` one scalar for all M."""
    def insert_rows(cache: Any, st: DecodeState, dst: Array, last_token: Array, pos: Array,
                    budget: Array, seed: Array, prompt_index: Array,
                    sample_index: Array) -> DecodeState:
        keys = sample_keys(seed, prompt_index, sample_index)  # as SamplingEngine.generate
        return kernels.insert(st, cache, jnp.zeros_like(dst), dst, last_token, pos, budget, keys)
    return jax.jit(insert_rows, donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _decode_fn(kernels: Any, stop_ids: tuple, spec: Any, steps: int) -> Any:
    """Jitted: `steps` decode steps → (state, [slots, 2·steps + 1] tokens/emitted/generated,
    [steps, slots] log-probs, [steps, slots] finish reasons)."""
    def decode(params: Any, st: DecodeState) -> tuple:
        st, outs = kernels.decode_chunk(params, st, jnp.asarray(stop_ids, jnp.int32), spec, steps)
        data = jnp.concatenate([outs.tokens.T, outs.emitted.T.astype(jnp.int32),
                                st.generated[:, None]], axis=1)
        return st, data, outs.logprobs, outs.finish
    return jax.jit(decode, donate_argnums=(1,))


class FlowRLEngine(engine_api.Engine):
    """JetStream Engine over `SamplingEngine`: fixed sampling params, one prefill and one
    insert per request, `tokens_per_generate` decode steps per generate; `set_params` swaps
    the weights served. Rollouts use its subclass `RolloutEngine`
    (sampling/jetstream_rollout_engine.py)."""

    def __init__(self, core: SamplingEngine, params: Any, tokenizer: Any, tokenizer_path: str,
                 sampling: SamplingParams, *, max_prefill_length: int = 1024, slots: int = 8,
                 cache_len: Optional[int] = None,
                 prefill_buckets: Optional[tuple[int, ...]] = None, tokens_per_generate: int = 1):
        sampling.validate()
        self.core = core
        self._params = core.params_of(params)
        self.tokenizer = tokenizer
        self.tokenizer_path = str(tokenizer_path)
        self.sampling = sampling
        self.spec = core.spec_for(sampling)
        self.stop_ids = core.stop_ids_for(sampling)
        self._max_prefill = bucket(max_prefill_length, JETSTREAM_LENGTHS)
        self._buckets = tuple(b for b in JETSTREAM_LENGTHS if b <= self._max_prefill)
        self._slots = int(slots)
        # decode steps per `generate` call: JetStream reads them as speculations of one step
        self._steps = int(tokens_per_generate)
        # prompt-body buckets of the prefill: the sampling engine's for rollouts (same shapes)
        self._body_buckets = tuple(prefill_buckets or self._buckets)
        # Cache: the longest prompt + max_new_tokens; a slot stops itself when it is full.
        self.cache_len = int(cache_len or self._max_prefill + sampling.max_new_tokens)
        core.check_fits([1], sampling.max_new_tokens, self._slots, self.cache_len)
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._prefill = core.kernels.prefill_jit
        # compiled once per kernels and settings, not per adapter (each trainer makes its own)
        self._generate = _decode_fn(core.kernels, tuple(int(t) for t in self.stop_ids), self.spec,
                                    self._steps)
        self._insert_rows = _insert_rows_fn(core.kernels)  # served and rollout requests
        self._live_params: Any = None  # the weights `set_params` pushed, served from then on

    # ----------------------------------------------------------------- Engine API

    def prefill(self, *, params: Any, existing_prefix: Optional[Any] = None,
                padded_tokens: Any, true_length: int) -> dict:
        """Cache of the prompt without its last token (that one is fed by the first generate)."""
        del existing_prefix  # session caches are not supported; validation rejects them
        tokens, n = self._prompt(padded_tokens, true_length)
        return {"cache": self._prefill_cache(params, tokens, n), "length": jnp.int32(n - 1),
                "last_token": jnp.int32(tokens[n - 1])}

    def _prompt(self, padded_tokens: Any, true_length: int) -> tuple[np.ndarray, int]:
        """The padded prompt with its ids clamped into the vocabulary, and its length n
        clamped to [1, padded length] (prefill clamps instead of raising: see the top)."""
        tokens = np.asarray(padded_tokens, np.int32).reshape(-1)
        n = int(min(max(int(true_length), 1), tokens.shape[0]))
        return np.clip(tokens, 0, self.core.arch.vocab_size - 1), n

    def _prefill_cache(self, params: Any, tokens: np.ndarray, n: int) -> Any:
        """The cache of the first n − 1 of `tokens` (one prompt)."""
        body = np.zeros((1, bucket(max(n - 1, 1), self._body_buckets)), np.int32)
        body[0, :n - 1] = tokens[:n - 1]
        return self._prefill(self._params_for(params), body, np.array([n - 1], np.int32))

    def insert(self, prefix: dict, decode_state: DecodeState, slot: int) -> DecodeState:
        """Start the request of `prefix` in `slot`, keyed (server seed, request number, 0)."""
        with self._lock:
            request = next(self._counter)
        return self._insert_rows(prefix["cache"], decode_state, np.asarray([slot], np.int32),
                                 prefix["last_token"][None], prefix["length"][None],
                                 np.asarray([self.cache_len], np.int32),
                                 np.uint32(self.sampling.seed % 2**32),
                                 np.asarray([request % 2**31], np.int32), np.zeros((1,), np.int32))

    def _params_for(self, params: Any) -> Any:
        return params if self._live_params is None else self._live_params

    def set_params(self, params: Any) -> None:
        """Serve the next requests with `params` (the trainer's weights after an update)."""
        self._live_params = self.core.params_of(params)

    def generate(self, params: Any, decode_state: DecodeState) -> tuple[DecodeState, Any]:
        st, data, _, _ = self._generate(self._params_for(params), decode_state)
        return st, self._result_tokens(data)

    def _result_tokens(self, data: Any) -> Any:
        """JetStream's view of one generate call's [slots, 2·steps + 1] outputs (tokens,
        emitted flags, tokens generated so far)."""
        k = self._steps
        return engine_api.ResultTokens(data=data, tokens_idx=(0, k), valid_idx=(k, 2 * k),
                                       length_idx=(2 * k, 2 * k + 1), samples_per_slot=1)

    def load_params(self, *args: Any, **kwargs: Any) -> Any:
        return self._params

    def init_decode_state(self, *args: Any, **kwargs: Any) -> DecodeState:
        return self.core.init_state(self._slots, self.cache_len)

    def get_prefix_destination_sharding(self) -> Any:
        if self.core.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.sharding.NamedSharding(self.core.mesh, jax.sharding.PartitionSpec())

    def get_tokenizer(self) -> Any:
        return js.tokenizer_pb2.TokenizerParameters(path=self.tokenizer_path)

    def build_tokenizer(self, metadata: Any) -> HFTokenizer:
        return HFTokenizer(self.tokenizer, {int(t) for t in self.stop_ids if t >= 0}, self._buckets)

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def mesh(self) -> jax.sharding.Mesh:
        if self.core.mesh is not None:
            return self.core.mesh
        from flowrl_jax.mesh import single_device_mesh
        return single_device_mesh()

    @property
    def colocated_cpus(self) -> None:
        return None

    # ----------------------------------------------------------------- validation

    def validate_request(self, request: Any) -> Optional[str]:
        """None when the DecodeRequest can be served, else a message naming the problem."""
        which = request.WhichOneof("content")
        if which is None:
            return "request has neither text_content nor token_content"
        if request.session_cache:
            return "session_cache (multi-turn prefix reuse) is not supported by this server"
        if which == "text_content":
            if not request.text_content.text:
                return "text_content.text is empty"
            ids = self.tokenizer.encode(request.text_content.text, add_special_tokens=False)
            n = len(ids) + (1 if self.tokenizer.bos_token_id is not None else 0)
        else:
            ids = list(request.token_content.token_ids)
            if not ids:
                return "token_content.token_ids is empty"
            vocab = self.core.arch.vocab_size
            bad = [t for t in ids if t < 0 or t >= vocab]
            if bad:
                return f"token_content.token_ids: id {bad[0]} is outside the vocabulary [0, {vocab})"
            n = len(ids) + (1 if self.tokenizer.bos_token_id is not None else 0)
        if n == 0:
            return "the prompt tokenizes to zero tokens"
        if n > self._max_prefill:
            return f"prompt has {n} tokens; this server accepts at most {self._max_prefill}"
        if request.max_tokens <= 0:
            return f"max_tokens must be > 0, got {request.max_tokens}"
        if request.max_tokens > self.sampling.max_new_tokens:
            return (f"max_tokens {request.max_tokens} exceeds this server's limit "
                    f"{self.sampling.max_new_tokens} (serve --max-new-tokens)")
        context = self.core.arch.max_position_embeddings
        if n + request.max_tokens > context:
            return (f"this model's maximum context length is {context} tokens; the prompt has "
                    f"{n} tokens and max_tokens is {request.max_tokens}")
        return None

    def prompt_ids(self, request: Any) -> list[int]:
        """The token ids of a validated request's prompt (no BOS: the sampler's convention)."""
        if request.WhichOneof("content") == "text_content":
            return self.tokenizer.encode(request.text_content.text, add_special_tokens=False)
        return list(request.token_content.token_ids)


class FlowRLDriver(js.orchestrator.Driver):
    """JetStream's driver with token requests fixed: upstream always prepends `bos_id` (for
    Qwen, which has no BOS, a stray pad token) and crashes on a list when it does not."""

    def _process_prefill_content(self, request, tokenizer, is_bos, max_prefill_length):
        content = request.prefill_content
        if isinstance(content, str):
            return super()._process_prefill_content(request, tokenizer, is_bos, max_prefill_length)
        has_bos = getattr(getattr(tokenizer, "tokenizer", None), "bos_token_id", None) is not None
        return js.token_utils.pad_tokens(np.asarray(content, np.int32), tokenizer.bos_id,
                                         tokenizer.pad_id, is_bos=is_bos and has_bos,
                                         max_prefill_length=max_prefill_length,
                                         jax_padding=self._jax_padding)
