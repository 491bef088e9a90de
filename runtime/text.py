"""Prompts to token ids for the released Wan models, as diffusers' pipelines make them.

The pipeline cleans a prompt (ftfy's `fix_text`, HTML entities unescaped twice, runs of white
space folded to one space) and tokenizes it with the checkpoint's T5 tokenizer: `</s>` appended,
truncated and right-padded to `max_sequence_length` (512), with an attention mask. The same
tokenizer runs here from the checkpoint's `tokenizer.json` through the `tokenizers` library
(the Rust tokenizer transformers itself wraps), so the runtime needs neither transformers nor torch.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import WanError


def prompt_clean(text: str) -> str:
    """diffusers' `prompt_clean`: basic_clean (ftfy, HTML unescape twice, strip) then
    whitespace_clean (`\\s+` -> ' ' with the `regex` module, strip)."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip()


@dataclass
class PromptTokenizer:
    """`tokenizers.Tokenizer` set up as the pipeline calls it: truncation and padding to
    `max_length`, special tokens added (T5's post-processor appends `</s>`)."""

    tokenizer: object  # tokenizers.Tokenizer
    max_length: int
    pad_id: int

    @classmethod
    def from_file(cls, path: str | Path, max_length: int, pad_token: str) -> "PromptTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for a bad file
            raise WanError(f"tokenizer '{path}' cannot be read: {str(exc).splitlines()[0]}") from None
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise WanError(f"tokenizer '{path}' has no pad token {pad_token!r}")
        tok.enable_truncation(max_length)
        tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        return cls(tok, max_length, pad_id)

    def __call__(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Cleaned prompts -> (ids, mask), both int64 (len(prompts), max_length)."""
        encodings = self.tokenizer.encode_batch([prompt_clean(p) for p in prompts], add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask
