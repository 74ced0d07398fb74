"""`finetune export --format gguf`: a llama.cpp LoRA GGUF written, read back, and equivalent to the peft adapter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from finetune.config import load_config
from finetune.errors import FinetuneError, VerificationError
from finetune.lifecycle.gguf_export import export_lora_gguf, permute_rows, read_lora_gguf, verify_lora_gguf
from finetune.testing import qa_rows, write_jsonl

LLAMA_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def adapter(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory, write_job) -> Path:
    from finetune.pipeline import run_train

    tmp = tmp_path_factory.mktemp("export_run")
    job = write_job(tmp, tiny_lm, write_jsonl(tmp / "train.jsonl", qa_rows(8)), train={"max_steps": 3})
    return run_train(load_config(job))


@pytest.fixture(scope="module")
def exported(adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.cli import main

    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(out)]) == 0
    return out


def test_metadata_is_what_llama_cpp_reads(exported: Path) -> None:
    meta, _ = read_lora_gguf(exported)
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0
    assert meta["general.architecture"] == "llama"


def test_tensor_names_and_shapes_follow_convert_lora_to_gguf(exported: Path, adapter: Path) -> None:
    _, tensors = read_lora_gguf(exported)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    want = {}
    for key, value in lora.items():
        layer, module = key.split(".layers.")[1].split(".")[0], key.split(".lora_")[0].rsplit(".", 1)[-1]
        suffix = "lora_a" if ".lora_A." in key else "lora_b"
        want[f"blk.{layer}.{LLAMA_NAMES[module]}.weight.{suffix}"] = tuple(value.shape)
    assert {k: v.shape for k, v in tensors.items()} == want  # A: (r, in), B: (out, r), numpy order


def test_values_round_trip_with_llama_q_k_permutation(exported: Path, adapter: Path) -> None:
    _, tensors = read_lora_gguf(exported)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn"
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"], lora[f"{key}.v_proj.lora_B.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_a"], lora[f"{key}.q_proj.lora_A.weight"].numpy())
    # q rows are permuted with the 4 attention heads, k rows with the 2 kv heads (GQA), as for the base weights
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"], permute_rows(lora[f"{key}.q_proj.lora_B.weight"], 4).numpy())
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight.lora_b"], permute_rows(lora[f"{key}.k_proj.lora_B.weight"], 2).numpy())


def test_rslora_scale_is_folded_so_llama_cpp_applies_peft_delta(adapter: Path, tmp_path: Path) -> None:
    """llama.cpp computes (alpha/r) * B @ A; for rsLoRA peft uses alpha/sqrt(r). The file must give peft's delta."""
    rs = tmp_path / "rs"
    shutil.copytree(adapter, rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    report = export_lora_gguf(rs, tmp_path / "rs.gguf")
    assert len(report.folded_scales) == 14
    _, tensors = read_lora_gguf(tmp_path / "rs.gguf")
    lora = load_file(str(rs / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.up_proj"
    peft_delta = cfg["lora_alpha"] / cfg["r"] ** 0.5 * (lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"])
    a, b = tensors["blk.1.ffn_up.weight.lora_a"], tensors["blk.1.ffn_up.weight.lora_b"]
    llama_cpp_delta = cfg["lora_alpha"] / a.shape[0] * (b @ a)
    np.testing.assert_allclose(llama_cpp_delta, peft_delta.numpy(), rtol=1e-5, atol=1e-7)


def test_read_back_catches_a_wrong_file(exported: Path) -> None:
    _, tensors = read_lora_gguf(exported)
    with pytest.raises(VerificationError, match="alpha"):
        verify_lora_gguf(exported, "llama", 16.0, tensors)
    tampered = {**tensors, "blk.0.attn_q.weight.lora_b": tensors["blk.0.attn_q.weight.lora_b"] * 2}
    with pytest.raises(VerificationError, match="values differ"):
        verify_lora_gguf(exported, "llama", 8.0, tampered)


def test_f16_export(adapter: Path, tmp_path: Path) -> None:
    report = export_lora_gguf(adapter, tmp_path / "h.gguf", outtype="f16")
    assert report.max_abs_diff > 0  # f16 rounding, accepted within the read-back tolerance
    assert read_lora_gguf(tmp_path / "h.gguf")[0]["general.file_type"] == 1


def test_refuses_what_llama_cpp_would_reject(adapter: Path, tmp_path: Path) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(FinetuneError, match=r"\[dora\]"):
        export_lora_gguf(dora, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _llama_cpp_sdist() -> Path | None:
    """llama-cpp-python's sdist (ships llama.cpp's converter), if already in the cache: tests never download."""
    cache = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))
    found = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    return found[-1] if found else None


@pytest.mark.skipif(_llama_cpp_sdist() is None, reason="llama-cpp-python sdist not in ~/.cache/finetune (see docs/lifecycle.md)")
def test_identical_to_llama_cpp_own_converter(adapter: Path, exported: Path, tiny_lm: Path, tmp_path: Path) -> None:
    sdist = _llama_cpp_sdist()
    assert sdist is not None
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                   (m.name.endswith(("convert_lora_to_gguf.py", "convert_hf_to_gguf.py")) or "/gguf-py/" in m.name or "/conversion/" in m.name)]
        tar.extractall(tmp_path, members=members, filter="data")
    root = next(tmp_path.glob("*/vendor/llama.cpp"))
    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, "convert_lora_to_gguf.py", "--base", str(tiny_lm), "--outfile", str(ref), "--outtype", "f32",
                    str(adapter)], cwd=root, check=True, capture_output=True, timeout=300)
    ours_meta, ours = read_lora_gguf(exported)
    ref_meta, theirs = read_lora_gguf(ref)
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    for key in ("general.type", "adapter.type", "adapter.lora.alpha", "general.architecture"):
        assert ours_meta[key] == ref_meta[key]


def test_delta_shapes_fit_the_base(exported: Path, tiny_lm: Path) -> None:
    """llama.cpp checks lora_a (r, in) and lora_b (out, r) against the base weight (out, in)."""
    _, tensors = read_lora_gguf(exported)
    base = load_file(str(tiny_lm / "model.safetensors"))
    q = base["model.layers.0.self_attn.q_proj.weight"]
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert (b.shape[0], a.shape[1]) == tuple(q.shape) and a.shape[0] == b.shape[1]
