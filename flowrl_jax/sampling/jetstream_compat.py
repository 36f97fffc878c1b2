"""The compatibility fixes that let google-jetstream 0.2.2 (archived upstream) run lean.

All of them live here, applied once by `import_jetstream()`:
1. `jetstream.engine.token_utils` imports `seqio.vocabularies` (which would pull TensorFlow,
   +2.4 GB) only for SentencePiece vocabularies we never use: when real seqio is absent, a
   tiny stand-in module provides the two class names.
2. The orchestrator calls `jax.tree_map`, removed from current jax: alias it to `jax.tree.map`
   (otherwise its generate thread raises and the orchestrator SIGKILLs its own process).
3. Importing `jetstream.core.orchestrator` sets the root logger to DEBUG with a stdout
   handler: the root logger's level and handlers are restored afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from typing import Any

def _install_seqio_shim() -> None:
    """Register a minimal `seqio.vocabularies` module unless the real seqio is installed."""
    if "seqio" in sys.modules or importlib.util.find_spec("seqio") is not None:
        return

    class Vocabulary:  # the base-class name jetstream imports; never instantiated by us
        """Stand-in for seqio.vocabularies.Vocabulary (type annotations only)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("seqio is not installed: SentencePiece vocabularies are unavailable; "
                               "flowrl-jax serves with the model's Hugging Face tokenizer")

    class SentencePieceVocabulary(Vocabulary):
        """Stand-in for seqio.vocabularies.SentencePieceVocabulary."""

    seqio = types.ModuleType("seqio")
    vocabularies = types.ModuleType("seqio.vocabularies")
    vocabularies.Vocabulary = Vocabulary
    vocabularies.SentencePieceVocabulary = SentencePieceVocabulary
    seqio.vocabularies = vocabularies
    seqio.__flowrl_shim__ = True
    sys.modules["seqio"] = seqio
    sys.modules["seqio.vocabularies"] = vocabularies


def import_jetstream() -> types.SimpleNamespace:
    """Import the JetStream modules we use, with the fixes applied; raises ImportError with the
    install command when google-jetstream is missing."""
    try:
        import jetstream  # noqa: F401
    except ImportError as e:
        raise ImportError("google-jetstream is not installed; install the lean route: "
                          "pip install --no-deps google-jetstream==0.2.2 && "
                          "pip install 'flowrl-jax[serve]'") from e
    import jax

    _install_seqio_shim()
    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree.map  # type: ignore[attr-defined]
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from jetstream.core import config_lib, orchestrator, server_lib
        from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
        from jetstream.engine import engine_api, token_utils, tokenizer_api, tokenizer_pb2
    finally:
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
    return types.SimpleNamespace(
        engine_api=engine_api, token_utils=token_utils, tokenizer_api=tokenizer_api,
        tokenizer_pb2=tokenizer_pb2, orchestrator=orchestrator, server_lib=server_lib,
        config_lib=config_lib, jetstream_pb2=jetstream_pb2, jetstream_pb2_grpc=jetstream_pb2_grpc)
