"""SentencePiece tokenizer wrapper (LLaMA's 32000-piece model or the micro models' own)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from runtime.errors import InputError


class Tokenizer:
    """Encodes and decodes text; `pad_id` falls back to eos when the model has no pad piece."""

    def __init__(self, model_path: str | Path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        from sentencepiece import SentencePieceProcessor  # lazy: the model code runs without it

        try:
            self.sp = SentencePieceProcessor(model_file=str(model_path))
        except (RuntimeError, OSError) as exc:
            raise InputError(f"{model_path}: not a sentencepiece tokenizer model ({exc})") from None
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        sp_pad = self.sp.pad_id()
        self.pad_id: int = sp_pad if sp_pad >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def layout_ids(self) -> frozenset[int]:
        """Pieces that are only layout: newlines, tabs and runs of spaces (indentation)."""
        if getattr(self, "_layout_ids", None) is not None:
            return self._layout_ids
        found = set()
        for i in range(self.n_words):
            text = self.id_to_piece(i).replace("▁", " ")
            if text and not text.strip(" \t\n") and not self.sp.is_control(i):
                found.add(i)
        found |= {i for i in range(self.n_words) if self.id_to_piece(i) in ("<0x0A>", "<0x09>")}
        self._layout_ids = frozenset(found)
        return self._layout_ids

    def sha256(self) -> str:
        """Content hash of the model file: two tokenizers are identical iff these agree."""
        from runtime.integrity import sha256_file

        return sha256_file(self.model_path)


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int = 8000,
    max_chunk_chars: int = 2000,
) -> Path:
    """Trains a LLaMA-style BPE sentencepiece model on code (whitespace kept verbatim).

    Identity normalisation and no whitespace folding keep indentation exact; newlines and tabs
    are their own pieces; byte fallback covers anything unseen. bos=1, eos=2, unk=0, no pad
    piece (as LLaMA). Characters outside the 99.95 % most frequent become bytes. Returns the
    path of the .model file.
    """
    from sentencepiece import SentencePieceTrainer

    def chunks() -> Iterator[str]:
        for text in texts:
            for start in range(0, len(text), max_chunk_chars):
                piece = text[start : start + max_chunk_chars]
                if piece.strip():
                    yield piece

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    SentencePieceTrainer.train(
        sentence_iterator=chunks(),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.9995,  # rare characters (e.g. in docstrings) fall back to bytes
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n", "\t"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentence_length=max_chunk_chars * 4,
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,  # one thread: reproducible
    )
    return model_prefix.with_suffix(".model")
