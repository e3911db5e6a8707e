"""The typing tests: pyright and mypy must accept every correct wiring in tests/typing and
reject every miswiring there (lines carrying expected-error comments).

Both checkers run with unused-ignore reporting on, so a checker that stops rejecting a
miswiring fails here just like one that starts rejecting a correct wiring. The self-tests at
the bottom prove the harness bites: they break one typing file on purpose and expect failures.
See tests/typing/README.md for the convention.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TYPING_DIR = REPO / "tests" / "typing"
PYRIGHT_CONFIG = TYPING_DIR / "pyrightconfig.json"
MYPY_CONFIG = TYPING_DIR / "mypy.ini"

MYPY_IGNORE = re.compile(r"#\s*type:\s*ignore(\[[^\]]*\])?")
PYRIGHT_IGNORE = re.compile(r"#\s*pyright:\s*ignore(\[[^\]]*\])?")
ONE_CHECKER = "# one-checker:"  # explicit, explained exception to the pairing rule


@dataclass(frozen=True)
class CheckerRun:
    returncode: int
    output: str
    errors: list[tuple[str, int, str]]  # (file name, 1-based line, message)
    files_checked: int


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                              check=False)
    except FileNotFoundError as error:  # pragma: no cover - broken environment
        pytest.fail(f"cannot run {command[:3]}: {error}; install the dev extras (pip install -e .[dev])")


def run_pyright(project: Path) -> CheckerRun:
    """pyright with the project's config (a pyrightconfig.json or its folder), JSON output."""
    done = _run([sys.executable, "-m", "pyright", "--outputjson", "-p", str(project),
                 "--pythonpath", sys.executable])
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright did not produce JSON (exit {done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr}")
    errors = [
        (Path(d["file"]).name, d["range"]["start"]["line"] + 1,
         f"{d['message']} ({d.get('rule', '')})")
        for d in report["generalDiagnostics"] if d["severity"] == "error"
    ]
    text = "\n".join(f"{name}:{line}: {message}" for name, line, message in errors)
    return CheckerRun(done.returncode, f"{text}\n{done.stderr}".strip(), errors,
                      int(report["summary"]["filesAnalyzed"]))


_MYPY_LINE = re.compile(r"^(?P<file>[^:\n]+\.py):(?P<line>\d+): error: (?P<message>.*)$", re.M)
_MYPY_COUNT = re.compile(r"(?:checked|found in) (\d+) source files?")


def run_mypy(*paths: Path) -> CheckerRun:
    done = _run([sys.executable, "-m", "mypy", "--config-file", str(MYPY_CONFIG),
                 "--no-color-output", *map(str, paths)])
    errors = [(Path(m["file"]).name, int(m["line"]), m["message"])
              for m in _MYPY_LINE.finditer(done.stdout)]
    count = _MYPY_COUNT.search(done.stdout)
    return CheckerRun(done.returncode, f"{done.stdout}\n{done.stderr}".strip(), errors,
                      int(count.group(1)) if count else -1)


def typing_files() -> list[Path]:
    return sorted(TYPING_DIR.glob("*.py"))


# ---------------------------------------------------------------------------------------------
# The typing tests themselves.


def test_typing_files_exist() -> None:
    names = {path.name for path in typing_files()}
    assert {"spec_slots.py", "linear_slots.py"} <= names
    assert not any(name.startswith("test_") for name in names), "typing files must not be test_*.py"


def test_pyright_accepts_correct_and_rejects_marked_wirings() -> None:
    run = run_pyright(PYRIGHT_CONFIG)
    assert run.returncode == 0, f"pyright -p {PYRIGHT_CONFIG} failed:\n{run.output}"
    assert run.files_checked == len(typing_files()), run.output


def test_mypy_accepts_correct_and_rejects_marked_wirings() -> None:
    run = run_mypy(TYPING_DIR)
    assert run.returncode == 0, f"mypy --config-file {MYPY_CONFIG} {TYPING_DIR} failed:\n{run.output}"
    assert run.files_checked == len(typing_files()), run.output


def test_expected_error_comments_come_in_pairs_with_codes() -> None:
    """Each expected-error line names the error for both checkers (or explains why not)."""
    problems: list[str] = []
    for path in typing_files():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            mypy = MYPY_IGNORE.search(line)
            pyright = PYRIGHT_IGNORE.search(line)
            where = f"{path.name}:{number}"
            for found, name in ((mypy, "type: ignore"), (pyright, "pyright: ignore")):
                if found and not found.group(1):
                    problems.append(f"{where}: '# {name}' without an error code/rule")
            if bool(mypy) != bool(pyright) and ONE_CHECKER not in line:
                problems.append(f"{where}: expected-error comment for only one checker; add the "
                                f"other or explain with '{ONE_CHECKER} <reason>'")
    assert not problems, "\n".join(problems)


def test_root_checker_configs_do_not_include_typing_tests() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["pyright"]["include"] == ["src"]
    assert pyproject["tool"]["mypy"]["files"] == ["src"]
    assert "tests/typing" in pyproject["tool"]["ruff"]["extend-exclude"]


# ---------------------------------------------------------------------------------------------
# Self-tests: the harness fails when a checker's verdict and the comments disagree.

_CORRECT_LINE = "GateSubmodules(gate=Gate)\n"
_MISWIRED_PREFIX = "GateSubmodules(gate=GateWithoutBias)"
_BOTH_COMMENTS = "  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]"


def _variant(source: str, target: str, new_line: str) -> tuple[str, int]:
    """`source` with the first line starting with `target` replaced; also that line's number."""
    lines = source.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.startswith(target):
            lines[index] = new_line + "\n"
            return "".join(lines), index + 1
    raise AssertionError(f"{target!r} not found in spec_slots.py")


def test_harness_fails_when_checkers_disagree_with_the_comments(tmp_path: Path) -> None:
    source = (TYPING_DIR / "spec_slots.py").read_text()
    assert _CORRECT_LINE in source.splitlines(keepends=True)
    miswired = next(line for line in source.splitlines() if line.startswith(_MISWIRED_PREFIX))
    assert miswired.endswith(_BOTH_COMMENTS)
    bare = miswired[: -len(_BOTH_COMMENTS)]

    # 1. An expected-error comment on a correct line: both checkers report an unused ignore.
    unused, unused_line = _variant(source, _CORRECT_LINE.strip(), _CORRECT_LINE.strip() + _BOTH_COMMENTS)
    # 2. The miswiring keeps only mypy's comment: pyright must report it (type: ignore is off).
    only_mypy, only_mypy_line = _variant(source, _MISWIRED_PREFIX, bare + "  # type: ignore[arg-type]")
    # 3. The miswiring keeps only pyright's comment: mypy must report it.
    only_pyright, only_pyright_line = _variant(
        source, _MISWIRED_PREFIX, bare + "  # pyright: ignore[reportArgumentType]")
    for name, text in (("bite_unused.py", unused), ("bite_only_mypy.py", only_mypy),
                       ("bite_only_pyright.py", only_pyright)):
        (tmp_path / name).write_text(text)

    config = json.loads(PYRIGHT_CONFIG.read_text())
    config["extraPaths"] = [str((TYPING_DIR / p).resolve()) for p in config.get("extraPaths", [])]
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))

    pyright = run_pyright(tmp_path / "pyrightconfig.json")
    assert pyright.returncode != 0, pyright.output
    assert {(f, line) for f, line, _ in pyright.errors} == {
        ("bite_unused.py", unused_line), ("bite_only_mypy.py", only_mypy_line)}, pyright.output
    assert any("Unnecessary" in m for f, _, m in pyright.errors if f == "bite_unused.py")
    assert any("reportArgumentType" in m for f, _, m in pyright.errors if f == "bite_only_mypy.py")

    mypy = run_mypy(tmp_path)
    assert mypy.returncode != 0, mypy.output
    assert {(f, line) for f, line, _ in mypy.errors} == {
        ("bite_unused.py", unused_line), ("bite_only_pyright.py", only_pyright_line)}, mypy.output
    assert any("unused-ignore" in m for f, _, m in mypy.errors if f == "bite_unused.py")
    assert any("[arg-type]" in m for f, _, m in mypy.errors if f == "bite_only_pyright.py")
