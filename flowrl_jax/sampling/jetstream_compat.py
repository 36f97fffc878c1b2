"""The compatibility fixes that let google-jetstream 0.2.2 (archived upstream) run lean.

All of them live here, applied once by `import_jetstream()`:
1. `jetstream.engine.token_utils` imports `seqio.vocabularies` (which would pull TensorFlow,
   +2.4 GB) only for SentencePiece vocabularies we never use: when real seqio is absent, a
   tiny stand-in module provides the two class names.
2. The orchestrator calls `jax.tree_map`, removed from current jax: alias it to `jax.tree.map`
   (otherwise its generate thread raises and the orchestrator SIGKILLs its own process).
3. Importing `jetstream.core.orchestrator` sets the root logger to DEBUG with a stdout
   handler: the root logger's level and handlers are restored afterwards.
4. The orchestrator's `JetThread` SIGKILLs the whole process when a driver thread raises —
   the trainer or the test runner it lives in, with no message that reaches a log. That
   includes the errors `Driver.stop()` itself provokes: it clears the return channel of
   requests it drains while other threads may still hold them. `DriverThread` replaces it:
   an error while its driver is stopping is dropped, any other is logged and kept on the
   driver (`driver_failure`) for the waiting caller to raise.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import threading
import types
from typing import Any

log = logging.getLogger(__name__)

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
    orchestrator.JetThread = DriverThread  # read when a Driver starts its threads
    if not any(isinstance(f, QuietJetStream) for f in root.filters):
        root.addFilter(QuietJetStream())
    return types.SimpleNamespace(
        engine_api=engine_api, token_utils=token_utils, tokenizer_api=tokenizer_api,
        tokenizer_pb2=tokenizer_pb2, orchestrator=orchestrator, server_lib=server_lib,
        config_lib=config_lib, jetstream_pb2=jetstream_pb2, jetstream_pb2_grpc=jetstream_pb2_grpc)


class QuietJetStream(logging.Filter):
    """Drops JetStream's records below WARNING: its driver logs every request's prefill,
    transfer and insert at INFO on the root logger (86,607 lines in one `make demo` with
    rollouts through JetStream); its warnings and errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}jetstream{os.sep}" not in record.pathname


class DriverThread(threading.Thread):
    """A JetStream driver thread whose failure is reported to its driver, not a SIGKILL."""

    def __init__(self, *args: Any, target: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, target=target, **kwargs)
        bound = target.func if isinstance(target, functools.partial) else target
        self.driver = getattr(bound, "__self__", None)  # the Driver whose loop this runs

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any error must end here, not in a SIGKILL
            if self.driver is not None and not getattr(self.driver, "live", True):
                log.debug("JetStream %s thread: %r while its driver stopped", self.name, exc)
                return
            log.error("JetStream %s thread failed", self.name, exc_info=True)
            if self.driver is not None and getattr(self.driver, "flowrl_failure", None) is None:
                self.driver.flowrl_failure = (f"its {self.name} thread failed: "
                                              f"{type(exc).__name__}: {exc}")


def driver_failure(driver: Any) -> str | None:
    """Why `driver` can no longer serve (a thread of it failed), or None while it is healthy."""
    return getattr(driver, "flowrl_failure", None)
