"""The Grain training-prompt pipeline: records → template → chat template → tokens → batches.

Order of operations (all deterministic given the config):
  records (all train sets, in order) → [filter over-long prompts] → shuffle(seed, reshuffled
  every epoch) → repeat(num_epochs) → tag each element with its global stream position (the
  group `uid`) → this host's slice [process_index::process_count] → tokenise (left-truncate)
  → batch of prompts_per_step / process_count prompts, each repeated G times, left-padded to
  a length bucket.
Global step s covers stream positions [s·P, (s+1)·P); host h gets positions s·P + h + k·hosts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import grain
import numpy as np

from flowrl_jax.config import Config, DataConfig
from flowrl_jax.data.records import DataError, LoadStats, Record
from flowrl_jax.data.registry import REGISTRY, load_custom, load_dataset
from flowrl_jax.data.templates import ChatRenderer, apply_template

log = logging.getLogger(__name__)


def load_train_records(data: DataConfig, data_dir: Optional[Union[str, Path]] = None
                       ) -> tuple[list[Record], LoadStats]:
    """Records of every set in `data.train` (names of `data.custom` entries or registry sets)."""
    customs = {s.name: s for s in data.custom}
    names = list(data.train)
    if not names:  # no named sets: train on every user data set
        names = [s.name for s in data.custom]
    if not names:
        raise DataError("data.train is empty and data.custom has no entries: nothing to train on")
    root = data_dir if data_dir is not None else data.data_dir
    records: list[Record] = []
    stats = LoadStats()
    for name in names:
        if name in customs:
            loaded = load_custom(customs[name], root, data.on_bad_row)
        elif name in REGISTRY:
            loaded = load_dataset(name, root, data.on_bad_row)
        else:
            raise DataError(f"data.train: unknown data set {name!r} (registry: "
                            f"{', '.join(REGISTRY)}; data.custom: {', '.join(customs) or 'none'})")
        records.extend(loaded.records)
        stats.merge(loaded.stats)
    if not records:
        raise DataError(f"data.train {names}: no usable rows ({stats.skipped} bad rows skipped)")
    return records, stats


class PromptEncoder:
    """Record → templated, chat-rendered, tokenised prompt (left-truncated to max_len)."""

    def __init__(self, tokenizer: Any, template: str, chat_template: bool, max_len: int):
        self.tokenizer = tokenizer
        self.template = template
        self.render = ChatRenderer(tokenizer, chat_template)
        self.max_len = max_len

    def text(self, record: Record) -> str:
        """The full prompt string the model sees."""
        return self.render(apply_template(record, self.template))

    def ids(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (no extra BOS: the chat template has its markers)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, item: tuple[int, Record]) -> dict:
        uid, record = item
        text = self.text(record)
        ids = self.ids(text)
        truncated = len(ids) > self.max_len
        if truncated:
            ids = ids[-self.max_len:]  # left truncation keeps the end (question + instruction)
        return {"uid": uid, "record": record, "text": text,
                "ids": np.asarray(ids, np.int32), "truncated": truncated}


def bucket_length(n: int, buckets: Sequence[int], max_len: int) -> int:
    """Smallest bucket ≥ n among the buckets below max_len and max_len itself."""
    for b in sorted({b for b in buckets if b < max_len} | {max_len}):
        if b >= n:
            return b
    raise ValueError(f"prompt of {n} tokens exceeds max_prompt_length {max_len}")


class Collate:
    """A list of encoded prompts → one rollout batch (each prompt G times, left-padded)."""

    def __init__(self, group_size: int, buckets: Sequence[int], max_len: int, pad_id: int):
        self.g = group_size
        self.buckets = tuple(buckets)
        self.max_len = max_len
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict]) -> dict:
        g = self.g
        length = bucket_length(max(len(it["ids"]) for it in items), self.buckets, self.max_len)
        n = len(items) * g
        input_ids = np.full((n, length), self.pad_id, np.int32)
        mask = np.zeros((n, length), np.int32)
        lens = np.zeros((n,), np.int32)
        for i, it in enumerate(items):
            k = len(it["ids"])
            rows = slice(i * g, (i + 1) * g)
            input_ids[rows, length - k:] = it["ids"]
            mask[rows, length - k:] = 1
            lens[rows] = k

        def rep(values: list) -> list:
            return [v for v in values for _ in range(g)]

        recs = [it["record"] for it in items]
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "prompt_lengths": lens,
            "group_index": np.repeat(np.arange(len(items), dtype=np.int32), g),
            "uid": np.repeat(np.asarray([it["uid"] for it in items], np.int64), g),
            "truncated": np.repeat(np.asarray([it["truncated"] for it in items], bool), g),
            "id": rep([r.id for r in recs]),
            "data_source": rep([r.data_source for r in recs]),
            "ground_truth": rep([r.ground_truth for r in recs]),
            "prompt": rep([r.prompt for r in recs]),
            "prompt_text": rep([it["text"] for it in items]),
            "extra": rep([r.extra for r in recs]),
        }


def _tag(index: int, record: Record) -> tuple[int, Record]:
    return index, record


@dataclass
class PipelineInfo:
    """What the pipeline was built from: counts for logs and the resume fingerprint."""

    num_records: int
    num_filtered: int  # prompts dropped as longer than max_prompt_length (truncation=filter)
    load_stats: LoadStats
    prompts_per_step: int
    local_prompts: int
    group_size: int
    process_index: int
    process_count: int
    steps_per_epoch: int  # global steps covering one pass over the prompts (floor)
    fingerprint: str = ""
    filtered_ids: list[str] = field(default_factory=list)


def _batches_from_grain(state: Any) -> Optional[int]:
    """Batches consumed, read from a Grain state (plain or per-worker), when it says so."""
    if isinstance(state, dict):
        if isinstance(state.get("next_index"), int):
            return state["next_index"]
        subs = state.get("iterators_in_use_states")
        if isinstance(subs, list) and subs and all(isinstance(x, dict) and
                                                   isinstance(x.get("next_index"), int)
                                                   for x in subs):
            return sum(x["next_index"] for x in subs)
    return None


class PromptIterator:
    """Iterator over rollout-step prompt batches with JSON-able and Orbax-able state."""

    def __init__(self, dataset: grain.IterDataset, info: PipelineInfo, worker_count: int = 0):
        self.dataset = dataset
        self.info = info
        self.worker_count = worker_count
        self.batches = 0  # rollout batches consumed (survives set_state)
        self.grain_iterator = iter(dataset)

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> dict:
        item = next(self.grain_iterator)
        self.batches += 1
        return item

    def get_state(self) -> dict:
        """JSON-able position in the stream (plus a fingerprint of the pipeline)."""
        gs = self.grain_iterator.get_state()
        batches = _batches_from_grain(gs)
        return {"grain": gs, "fingerprint": self.info.fingerprint,
                "worker_count": self.worker_count,
                "batches": self.batches if batches is None else batches}

    def set_state(self, state: dict) -> None:
        """Resume from `get_state()` output; refuses a state of a differently built pipeline."""
        fp = state.get("fingerprint")
        if fp and fp != self.info.fingerprint:
            raise DataError("data iterator state was saved by a different data pipeline (data "
                            "sets, seed, sizes or hosts changed); cannot resume it exactly")
        saved_workers = state.get("worker_count", self.worker_count)
        grain_state = state["grain"]
        if saved_workers != self.worker_count:
            if self.worker_count != 0 or "batches" not in state:
                raise DataError(f"data iterator state was saved with data.worker_count="
                                f"{saved_workers}, this pipeline has {self.worker_count}: resume "
                                f"with the same worker_count (or 0)")
            # Without workers the Grain state is just the next batch index of the MapDataset.
            grain_state = {"next_index": int(state["batches"])}
        self.grain_iterator.set_state(grain_state)
        self.batches = int(state.get("batches", self.batches))

    def save_args(self) -> Any:
        """Orbax args saving this iterator (`ocp.args.Composite(..., data_iter=it.save_args())`)."""
        import grain.checkpoint as gc

        return gc.CheckpointSave(self.grain_iterator)

    def restore_args(self) -> Any:
        """Orbax args restoring into this iterator in place."""
        import grain.checkpoint as gc

        return gc.CheckpointRestore(self.grain_iterator)

    def close(self) -> None:
        """Stop worker processes (if any)."""
        close = getattr(self.grain_iterator, "close", None)
        if close is not None:
            close()


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; mark them parsed (defaults) when no absl main ran."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_index_count(process_index: Optional[int], process_count: Optional[int]
                         ) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _fingerprint(records: list[Record], data: DataConfig, **sizes: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sizes, sort_keys=True).encode())
    h.update(json.dumps([data.seed, data.shuffle, data.num_epochs, data.template,
                         data.chat_template, data.max_prompt_length, data.truncation,
                         list(data.length_buckets)]).encode())
    for r in records:
        h.update(r.id.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def build_train_pipeline(cfg: Union[Config, DataConfig], tokenizer: Any, group_size: int,
                         prompts_per_step: int, *, process_index: Optional[int] = None,
                         process_count: Optional[int] = None,
                         records: Optional[list[Record]] = None) -> PromptIterator:
    """The training prompt iterator: each item is this host's prompt batch of one rollout step.

    `cfg` is a `Config` (uses `cfg.data`) or a `DataConfig`. `records` overrides loading the
    sets of `data.train` (tests, programmatic use). Items are dicts with arrays `input_ids`
    and `attention_mask` [B·G, L] (left-padded), `prompt_lengths`, `group_index`, `uid`,
    `truncated` [B·G] and per-row lists `id`, `data_source`, `ground_truth`, `prompt`,
    `prompt_text`, `extra`, where B = prompts_per_step / process_count.
    """
    data = cfg.data if isinstance(cfg, Config) else cfg
    data.validate()
    if group_size < 1 or prompts_per_step < 1:
        raise ValueError(f"group_size ({group_size}) and prompts_per_step ({prompts_per_step}) "
                         "must be >= 1")
    pi, pc = _process_index_count(process_index, process_count)
    if prompts_per_step % pc:
        raise ValueError(f"prompts_per_step {prompts_per_step} is not divisible by the "
                         f"{pc} data-loading processes")
    local = prompts_per_step // pc
    stats = LoadStats()
    if records is None:
        records, stats = load_train_records(data)
    else:
        stats.read = stats.kept = len(records)
    max_len = data.max_prompt_length
    encoder = PromptEncoder(tokenizer, data.template, data.chat_template, max_len)

    filtered_ids: list[str] = []
    if data.truncation == "filter":
        texts = [encoder.text(r) for r in records]
        lens = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        keep = [r for r, n in zip(records, lens) if n <= max_len]
        filtered_ids = [r.id for r, n in zip(records, lens) if n > max_len]
        if filtered_ids:
            log.warning("data: filtered %d of %d prompts longer than max_prompt_length=%d",
                        len(filtered_ids), len(records), max_len)
        records = keep
    if len(records) < prompts_per_step:
        raise DataError(f"only {len(records)} training prompts but prompts_per_step is "
                        f"{prompts_per_step}")
    if stats.skipped:
        log.warning("data: skipped %d bad row(s) in the training sets", stats.skipped)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    fp = _fingerprint(records, data, group_size=group_size, prompts_per_step=prompts_per_step,
                      process_index=pi, process_count=pc)
    info = PipelineInfo(num_records=len(records), num_filtered=len(filtered_ids),
                        load_stats=stats, prompts_per_step=prompts_per_step, local_prompts=local,
                        group_size=group_size, process_index=pi, process_count=pc,
                        steps_per_epoch=len(records) // prompts_per_step, fingerprint=fp,
                        filtered_ids=filtered_ids)

    ds = grain.MapDataset.source(records)
    if data.shuffle:
        ds = ds.shuffle(seed=data.seed)  # reshuffled differently in every epoch by repeat()
    ds = ds.repeat(data.num_epochs)
    ds = ds.map_with_index(_tag)
    if data.num_epochs is not None:
        # Whole global steps only, so every host yields the same number of batches.
        ds = ds[:len(ds) - len(ds) % prompts_per_step]
    if pc > 1:
        ds = ds[pi::pc]
    ds = ds.map(encoder)
    ds = ds.batch(local, drop_remainder=True,
                  batch_fn=Collate(group_size, data.length_buckets, max_len, pad_id))
    # Grain's default read-ahead (16 threads, 500 elements) would tokenise hundreds of rollout
    # batches in the background; one thread two batches ahead keeps up with any rollout step.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if data.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
    log.info("data: %d prompts, %d per step (%d on this host), G=%d, %d steps/epoch",
             len(records), prompts_per_step, local, group_size, info.steps_per_epoch)
    return PromptIterator(it_ds, info, data.worker_count)


def save_iterator(directory: Union[str, Path], iterator: PromptIterator) -> None:
    """Save the iterator position to `directory` with Orbax (grain's checkpoint handler)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.save(Path(directory).resolve(), ocp.args.Composite(data_iter=iterator.save_args()))
    ckptr.close()


def restore_iterator(directory: Union[str, Path], iterator: PromptIterator) -> PromptIterator:
    """Restore the iterator position saved by `save_iterator` into `iterator` (in place)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckptr.restore(Path(directory).resolve(), ocp.args.Composite(data_iter=iterator.restore_args()))
    ckptr.close()
    return iterator
