"""Data: named data sets and user data sets → Records → templated, tokenised Grain batches."""

from flowrl_jax.data.extract import gsm8k_answer, last_boxed, number_to_str, olympiad_answer
from flowrl_jax.data.pipeline import (PipelineInfo, PromptIterator, build_train_pipeline,
                                      load_train_records, restore_iterator, save_iterator)
from flowrl_jax.data.records import BadRow, DataError, LoadStats, Record, iter_rows, read_records
from flowrl_jax.data.registry import (ENV_DATA_DIR, PACKAGED_DATA_DIR, REGISTRY, DatasetInfo,
                                      LoadedSet, list_datasets, load_custom, load_dataset,
                                      load_eval_set, resolve_data_dir)
from flowrl_jax.data.templates import (MATH_TEMPLATE, ChatRenderer, apply_template,
                                       code_prompt)
from flowrl_jax.data.tokenizer import (ENDOFTEXT_ID, IM_END_ID, IM_START_ID, PACKAGED_TOKENIZER,
                                       load_tokenizer)

__all__ = [
    "BadRow", "ChatRenderer", "DataError", "DatasetInfo", "ENDOFTEXT_ID", "ENV_DATA_DIR",
    "IM_END_ID", "IM_START_ID", "LoadStats", "LoadedSet", "MATH_TEMPLATE", "PACKAGED_DATA_DIR",
    "PACKAGED_TOKENIZER",
    "PipelineInfo", "PromptIterator", "REGISTRY", "Record", "apply_template",
    "build_train_pipeline", "code_prompt", "gsm8k_answer", "iter_rows", "last_boxed",
    "list_datasets", "load_custom", "load_dataset", "load_eval_set", "load_tokenizer",
    "load_train_records", "number_to_str", "olympiad_answer", "read_records",
    "resolve_data_dir", "restore_iterator", "save_iterator",
]
