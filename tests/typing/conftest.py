"""The files here are only type-checked (by tests/test_typing.py), never collected or run."""

collect_ignore_glob = ["*.py"]
