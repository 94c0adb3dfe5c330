"""Tokenizers from diffusers pipeline components: the folder's own tokenizer files through transformers (no
re-implementation). The text encoders' weights are read by `jaxdit.convert.load_text_encoder`."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(folder):
    """The transformers tokenizer stored in a diffusers `tokenizer*/` folder (local files only)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot load a tokenizer from this folder: {e}") from e
