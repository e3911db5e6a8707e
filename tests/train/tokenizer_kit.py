"""A tiny byte-level BPE tokenizer trained in the test (no download), and text to train it on."""

from __future__ import annotations

from pathlib import Path

CODE = "def greet(name):\n    return 'hello ' + name\n\n"
PROSE = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles.\n"


def build_tokenizer(path: Path, *, vocab_size: int = 320) -> Path:
    """Train a byte-level BPE tokenizer (with an `<|endoftext|>` token) and save it to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([CODE * 20, PROSE * 20], trainer)
    tokenizer.save(str(path))
    return path


def write_text_folder(folder: Path, *, repeat: int = 40) -> Path:
    """A folder of two text files, a hidden file and a binary file (the last two skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "code.py").write_text(CODE * repeat)
    (folder / "prose.txt").write_text(PROSE * repeat)
    (folder / ".hidden").write_text("never read")
    (folder / "image.bin").write_bytes(b"\x89PNG\0\0" + bytes(200))
    return folder
