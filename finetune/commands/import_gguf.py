"""`finetune import-gguf FILE OUT_DIR`: convert a GGUF checkpoint once into a Hugging Face folder."""

from __future__ import annotations

import argparse

from finetune.model.gguf_import import GgufFile, import_gguf, is_imported

HELP = "Convert a GGUF checkpoint (de-quantized) into a Hugging Face folder that `model.name_or_path` can use."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="The .gguf file.")
    parser.add_argument("out_dir", help="Folder to write; an existing import of the same file is reused as is.")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="Dtype of the saved weights (default bfloat16: half the disk, same model).")
    parser.add_argument("--force", action="store_true", help="Replace OUT_DIR if it holds something else.")


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path


    out = Path(args.out_dir).expanduser().resolve()
    if is_imported(out, GgufFile.at(args.file), args.dtype):
        print(f"already imported: {out}")
        return 0
    start = time.perf_counter()
    import_gguf(args.file, out, args.dtype, args.force)
    print(f"imported {args.file} -> {out} in {time.perf_counter() - start:.1f} s")
    return 0
