"""Data stage: files -> rows -> token ids with loss masks -> batches.

`build_data(cfg, tokenizer, task)` is the only entry point the pipeline uses; it returns a `DataBundle`.
"""

from finetune.data.build import DataBundle, build_data

__all__ = ["DataBundle", "build_data"]
