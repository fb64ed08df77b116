"""Prompt tokenizer for the CLIP text tower, on the ``tokenizers`` library.

* :meth:`CLIPTokenizer.from_file` loads a ``tokenizer.json`` (e.g. the CLIP BPE tokenizer shipped with
  CLIP/Text2CT weights, or one trained here).
* :meth:`CLIPTokenizer.train` trains a byte-level BPE (GPT-2 style byte alphabet, so no text is ever
  unknown) with CLIP's ``<|startoftext|>`` / ``<|endoftext|>`` tokens, lower-casing and whitespace folding
  as CLIP does, on a corpus of reports.
* :meth:`CLIPTokenizer.encode` gives fixed-length ids: ``<|startoftext|> tokens <|endoftext|> pad...``.
  Longer prompts are truncated (end-of-text kept last) with a :class:`PromptTruncatedWarning`; an empty
  prompt is a ``ValueError`` unless ``allow_empty=True`` (unconditional generation asked for explicitly).

Command line::

    python -m text2ct_engine.tokenizer train --corpus reports.csv [more files] --vocab-size 16000 \\
        --out tokenizer.json [--context-length 512] [--min-frequency 2] [--force]
    python -m text2ct_engine.tokenizer encode --tokenizer tokenizer.json --prompt "Findings: ..."

A corpus file is a CSV of reports (CT-RATE's ``Findings_EN`` / ``Impressions_EN`` columns, joined as
``"Findings: ... Impression: ..."``, or a ``text``/``report``/``prompt`` column) or a text file with one
report per line.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .cli import Parser, path as cli_path
from .io_utils import atomic_path

__all__ = ["CLIPTokenizer", "TokenizedPrompts", "PromptTruncatedWarning", "report_text", "read_corpus",
           "BOS_TOKEN", "EOS_TOKEN", "main"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_CONTEXT_LENGTH = 77
MIN_VOCAB_SIZE = 256 + 2  # the byte alphabet and the two special tokens


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the context length and its end was dropped."""


@dataclass
class TokenizedPrompts:
    """Fixed-length encoding of a batch of prompts."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64, 1 = real token (start/end tokens included)
    empty: torch.Tensor  # (B,) bool: the prompt was empty (only with allow_empty=True); its context may be zeroed

    def to(self, device: str | torch.device) -> "TokenizedPrompts":
        return TokenizedPrompts(self.input_ids.to(device), self.attention_mask.to(device), self.empty.to(device))


def report_text(findings: str | None, impressions: str | None) -> str:
    """Text2CT's prompt layout: ``"Findings: ... Impression: ..."`` (empty parts left out)."""
    parts = []
    for label, value in (("Findings:", findings), ("Impression:", impressions)):
        value = (value or "").strip()
        if value and value.lower() != "nan":
            parts.append(f"{label} {value}")
    return " ".join(parts)


class CLIPTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; adds start/end tokens, truncation and padding itself.

    ``context_length``: explicit, else the ``truncation.max_length`` stored in the tokenizer.json, else 77.
    ``pad_token``: explicit, else the stored ``padding.pad_token``, else the end-of-text token (as HF's
    OpenAI CLIP tokenizer). Pooling in the text tower picks the first end-of-text token, so padding with it
    is safe.
    """

    def __init__(self, backend, context_length: int | None = None, bos_token: str = BOS_TOKEN,
                 eos_token: str = EOS_TOKEN, pad_token: str | None = None) -> None:
        self.backend = backend
        stored_len = (backend.truncation or {}).get("max_length")
        stored_pad = (backend.padding or {}).get("pad_token")
        self.context_length = int(context_length or stored_len or DEFAULT_CONTEXT_LENGTH)
        if self.context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end tokens), got {self.context_length}")
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or stored_pad or eos_token
        ids = {}
        for role, token in (("start", bos_token), ("end", eos_token), ("pad", self.pad_token)):
            ids[role] = backend.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"tokenizer has no {role} token {token!r}")
        self.bos_id, self.eos_id, self.pad_id = ids["start"], ids["end"], ids["pad"]
        # CLIP's BPE marks word ends with a suffix ("</w>") that decoding must turn back into spaces
        model = json.loads(backend.to_str()).get("model", {})
        self._word_suffix = model.get("end_of_word_suffix") or None
        # we truncate and pad ourselves; the backend encodes raw pieces
        backend.no_truncation()
        backend.no_padding()

    # ------------------------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int | None = None, **kwargs) -> "CLIPTokenizer":
        """Load a ``tokenizer.json``."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a valid tokenizer.json ({first})") from None
        return cls(backend, context_length, **kwargs)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              context_length: int = DEFAULT_CONTEXT_LENGTH) -> "CLIPTokenizer":
        """Train a byte-level BPE with ``<|startoftext|>`` (id 0) and ``<|endoftext|>`` (id 1) on ``texts``.

        The text tower using it needs ``eos_token_id=1`` (first-occurrence pooling) and
        ``vocab_size >= tokenizer.vocab_size``.
        """
        from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + 2 special tokens), "
                             f"got {vocab_size}")
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.Sequence([
            normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase(), normalizers.Strip()])
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[BOS_TOKEN, EOS_TOKEN],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        count = 0

        def counted() -> Iterator[str]:
            nonlocal count
            for text in texts:
                if text and text.strip():
                    count += 1
                    yield text

        backend.train_from_iterator(counted(), trainer)
        if count == 0:
            raise ValueError("the corpus has no text to train on")
        bos, eos = backend.token_to_id(BOS_TOKEN), backend.token_to_id(EOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}", pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
            special_tokens=[(BOS_TOKEN, bos), (EOS_TOKEN, eos)])
        return cls(backend, context_length)

    def to_str(self) -> str:
        """The tokenizer.json text, recording this context length (truncation) and pad token (padding)."""
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(self.backend.to_str())
        copy.enable_truncation(self.context_length)
        copy.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token, length=self.context_length)
        return copy.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_str()
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    # ------------------------------------------------------------------------------- encoding

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without start/end tokens, untruncated."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode(self, prompts: str | Sequence[str], *, allow_empty: bool = False,
               context_length: int | None = None) -> TokenizedPrompts:
        """Fixed-length ids (B, L) for one prompt or a list; see the module docstring for the rules."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__}, not str")
        length = int(context_length or self.context_length)
        if length < 2:
            raise ValueError(f"context_length must be at least 2, got {length}")
        pieces = self.backend.encode_batch(prompts, add_special_tokens=False)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        empty = torch.zeros(len(prompts), dtype=torch.bool)
        for i, (prompt, piece) in enumerate(zip(prompts, pieces)):
            tokens = piece.ids
            if not tokens:
                if not allow_empty:
                    which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                    raise ValueError(f"{which} is empty; pass allow_empty=True to ask for unconditional generation")
                empty[i] = True
            if len(tokens) > length - 2:
                start = " ".join(prompt.split())
                start = f'"{start[:40]}..."' if len(start) > 40 else f'"{start}"'
                which = f"prompt {i} ({start})" if len(prompts) > 1 else f"the prompt {start}"
                warnings.warn(f"{which} has {len(tokens) + 2} tokens with start/end, more than the context "
                              f"length {length}: truncated to its first {length - 2} tokens",
                              PromptTruncatedWarning, stacklevel=2)
                tokens = tokens[: length - 2]
            row = [self.bos_id, *tokens, self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return TokenizedPrompts(ids, mask, empty)

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids`` without special tokens (CLIP's lower-cased, whitespace-folded form)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        special = {self.bos_id, self.eos_id, self.pad_id}
        text = self.backend.decode([i for i in ids if i not in special], skip_special_tokens=True)
        if self._word_suffix:
            text = text.replace(self._word_suffix, " ")
        return " ".join(text.split())


# ----------------------------------------------------------------------------------- corpus + CLI

_TEXT_COLUMNS = ("text", "report", "prompt")


def read_corpus(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Reports from CSV files (CT-RATE columns or a text column) and text files (one report per line), UTF-8;
    a file that is not is a one-line ``ValueError`` naming it."""
    texts: list[str] = []
    for p in paths:
        try:
            texts.extend(_read_corpus_file(Path(p)))
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus file {p} is not UTF-8 text (byte 0x{err.object[err.start]:02x}: "
                             f"{err.reason}): save it as UTF-8") from None
    return [t for t in texts if t.strip()]


def _read_corpus_file(path: Path) -> list[str]:
    """The reports of one corpus file (see :func:`read_corpus`)."""
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix.lower() != ".csv":
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = {c.strip(): c for c in (reader.fieldnames or [])}
        if "Findings_EN" in cols or "Impressions_EN" in cols:
            fcol, icol = cols.get("Findings_EN"), cols.get("Impressions_EN")
            return [report_text(row.get(fcol) if fcol else None, row.get(icol) if icol else None) for row in reader]
        col = next((cols[c] for c in cols if c.lower() in _TEXT_COLUMNS), None)
        if col is None:
            raise ValueError(f"{path}: CSV has no report columns (Findings_EN/Impressions_EN, or one "
                             f"of {', '.join(_TEXT_COLUMNS)})")
        return [(row.get(col) or "") for row in reader]


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m text2ct_engine.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a byte-level BPE tokenizer on reports")
    tr.add_argument("--corpus", type=cli_path, nargs="+", required=True,
                    help="report CSV(s) or text file(s), one report a line")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out", type=cli_path, required=True, help="tokenizer.json to write")
    tr.add_argument("--min-frequency", type=int, default=2)
    tr.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH,
                    help="stored in the file; the text tower's max_position_embeddings (77 or 512)")
    tr.add_argument("--force", action="store_true", help="overwrite --out")
    en = sub.add_parser("encode", help="print the ids of a prompt")
    en.add_argument("--tokenizer", type=cli_path, required=True)
    en.add_argument("--prompt", required=True)
    en.add_argument("--context-length", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 failed, 2 bad usage)."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            out = Path(args.out)
            if args.vocab_size < MIN_VOCAB_SIZE:
                raise _Usage(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {args.vocab_size}")
            if args.min_frequency < 1:
                raise _Usage(f"--min-frequency must be at least 1, got {args.min_frequency}")
            if args.context_length < 2:
                raise _Usage(f"--context-length must be at least 2, got {args.context_length}")
            if out.is_dir():
                raise _Usage(f"--out {out} is a directory; give a file path such as {out / 'tokenizer.json'}")
            if out.exists() and not args.force:
                raise _Usage(f"{out} exists; pass --force to overwrite it")
            if not out.parent.exists() or not os.access(out.parent if str(out.parent) else ".", os.W_OK):
                raise _Usage(f"cannot write {out}: directory {out.parent} is missing or not writable")
            texts = read_corpus(args.corpus)
            if not texts:
                raise ValueError(f"the corpus ({', '.join(args.corpus)}) has no text")
            tok = CLIPTokenizer.train(texts, args.vocab_size, args.min_frequency, args.context_length)
            tok.save(out)
            print(f"wrote {out}: vocab {tok.vocab_size} from {len(texts)} reports, context length "
                  f"{tok.context_length}, <|startoftext|>={tok.bos_id} <|endoftext|>={tok.eos_id}")
        else:
            tok = CLIPTokenizer.from_file(args.tokenizer, args.context_length)
            if not args.prompt.strip():
                raise ValueError("--prompt is empty: give the text to encode")
            enc = tok.encode(args.prompt)
            n = int(enc.attention_mask.sum())
            print(" ".join(str(i) for i in enc.input_ids[0, :n].tolist()))
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


class _Usage(Exception):
    pass


if __name__ == "__main__":
    sys.exit(main())
