"""Review findings in hf_files: a sharded index must not reach outside its directory, and a
tensor the index lists but its shard lacks is an HFConversionError, not safetensors' own error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protoformer.interop import HFConversionError
from protoformer.interop.hf_files import INDEX_FILE, SafetensorsSource


def _index(directory: Path, weight_map: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}), encoding="utf-8")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors",
                                   "ABSOLUTE", "..", "sub/inner.safetensors"])
def test_an_index_naming_a_file_outside_the_directory_is_refused(tmp_path: Path,
                                                                 shard: str) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"a": torch.zeros(2)}, str(outside))
    (tmp_path / "ck" / "sub").mkdir(parents=True)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "ck" / "sub" / "inner.safetensors"))
    _index(tmp_path / "ck", {"a": str(outside) if shard == "ABSOLUTE" else shard})
    with pytest.raises(HFConversionError, match="plain file names"):
        SafetensorsSource(tmp_path / "ck")


def test_a_plain_shard_name_still_loads(tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    _index(directory, {"a": "model-00001-of-00001.safetensors"})
    save_file({"a": torch.ones(3)}, str(directory / "model-00001-of-00001.safetensors"))
    source = SafetensorsSource(directory)
    assert torch.equal(source.get("a"), torch.ones(3))
    assert source.dtype("a") == torch.float32


def test_the_dtype_of_a_tensor_missing_from_its_shard_is_a_conversion_error(
        tmp_path: Path) -> None:
    directory = tmp_path / "ck"
    _index(directory, {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"})
    save_file({"other": torch.ones(3)}, str(directory / "model-00001-of-00001.safetensors"))
    source = SafetensorsSource(directory)
    with pytest.raises(HFConversionError, match="cannot read tensor"):
        source.dtype("model.embed_tokens.weight")
