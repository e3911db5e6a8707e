"""Hostile spec files: bounded reading and bounded messages.

A 200 MB builder name used to produce a 400 MB error message; `{"__dtype__": "onnx"}`
imported torch.onnx before refusing. Each error here is one short SpecError.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protoformer.spec import SpecError, from_dict, load_spec, loads_spec
from protoformer.spec.serialize import decode_builder, decode_value

HUGE = 1_000_000  # characters: big enough that a message quoting it whole is obvious

BAD_NAMES = [
    "a" * HUGE + ":X",                                    # module path not identifiers
    "protoformer.x:" + "a" * HUGE,                         # allowed prefix, long name
    "os:" + "A" * HUGE,                                    # refused module
    "protoformer.transformer.norm:RMSNorm." + "a" * HUGE,  # attribute traversal
    "x" * HUGE,                                            # no colon
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=["module", "allowed", "refused", "attr", "colon"])
def test_a_huge_builder_name_gives_a_short_message(name: str) -> None:
    for decode in (lambda: from_dict({"__submodules__": name, "fields": {}}),
                   lambda: decode_builder(name),
                   lambda: decode_value({"__partial__": name}),
                   lambda: decode_value({"__enum__": name + ".member"})):
        with pytest.raises(SpecError) as info:
            decode()
        assert len(str(info.value)) < 1_000, len(str(info.value))


def test_huge_keys_and_paths_give_a_short_message() -> None:
    record = {"__submodules__": "protoformer.transformer.mlp:MLPSubmodules",
              "fields": {"k" * HUGE: None}}
    with pytest.raises(SpecError) as info:
        from_dict(record)
    assert len(str(info.value)) < 1_000
    nested = {"__partial__": "protoformer.transformer.norm:RMSNorm",
              "kwargs": {"eps": {"k" * HUGE: {"__dtype__": "nope"}}}}
    with pytest.raises(SpecError) as info:
        decode_value(nested)
    assert len(str(info.value)) < 1_000


def test_a_deep_spec_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match=r"deep\.json: nested too deeply") as info:
        load_spec(path)
    assert "\n" not in str(info.value)
    shallow_enough_for_json = '{"__submodules__": ' + "[" * 600 + "]" * 600 + "}"
    with pytest.raises(SpecError, match="nested more than 256 levels"):
        loads_spec(shallow_enough_for_json)


def test_a_spec_file_over_the_size_limit_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import protoformer.spec.files as files

    monkeypatch.setattr(files, "MAX_SPEC_BYTES", 100)
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"pad": "x" * 1000}))
    with pytest.raises(SpecError, match=r"big\.json: the spec file is larger than 100 bytes"):
        load_spec(path)


def test_a_dtype_name_that_is_a_lazy_torch_submodule_imports_nothing() -> None:
    # In a fresh interpreter: this test process may have imported torch.onnx already.
    code = (
        "import sys\n"
        "from protoformer.spec import SpecError\n"
        "from protoformer.spec.serialize import decode_value\n"
        "for name in ('onnx', 'distributed', 'nn'):\n"
        "    try:\n"
        "        decode_value({'__dtype__': name})\n"
        "    except SpecError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'{name} accepted')\n"
        "loaded = [m for m in ('torch.onnx',) if m in sys.modules]\n"
        "print(loaded)\n"
        "assert decode_value({'__dtype__': 'bfloat16'}) is __import__('torch').bfloat16\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
