"""CLIP tokenizers written as files: the real 49408-token vocabulary (from the vendored BPE merges) and small ones
learned from a word list for the built-in models. Every CLIP tokenizer sdlora writes is built here."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CLIP_BPE = ASSETS / "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (the base of its BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def bpe_vocab(merges: list[str]) -> dict[str, int]:
    """The vocabulary CLIP's tokenizer derives from a merges list: bytes, word-final bytes, one token per merge, then
    the start and end tokens (a token met twice keeps its first id)."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [START, END]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's 49408-token vocabulary, built from the BPE merges file the same way the original tokenizer does."""
    with gzip.open(CLIP_BPE, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]
    return bpe_vocab(merges), merges


def learn_merges(words, count: int = 300) -> list[str]:
    """A few hundred BPE merges from a small word list: enough for realistic multi-character tokens."""
    corpus = Counter({tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in words})
    merges = []
    for _ in range(count):
        pairs = Counter()
        for word, freq in corpus.items():
            for a, b in pairwise(word):
                pairs[(a, b)] += freq
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        new = Counter()
        for word, freq in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += freq
        corpus = new
    return merges


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], *, pad_token: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}), encoding="utf-8")


def write_word_tokenizers(folder: Path, words, *names_and_pads: tuple[str, str], merges: int = 300) -> dict[str, int]:
    """Small CLIP tokenizers learned from `words`, one per (subfolder, pad token); returns their shared vocabulary."""
    learned = learn_merges(words, count=merges)
    vocab = bpe_vocab(learned)
    for name, pad in names_and_pads:
        write_tokenizer(Path(folder) / name, vocab, learned, pad_token=pad)
    return vocab
