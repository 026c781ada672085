"""A CLIP byte-level BPE tokenizer over a closed vocabulary.

Real CLIP vocabularies cannot be downloaded here, so the tiny and mini models
carry a tokenizer generated from a word list: every byte symbol (as in CLIP),
then BPE merges learnt from the word list, so each listed word becomes one
token and any other text still tokenizes (into byte symbols).
"""

from __future__ import annotations

import json
from functools import lru_cache

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    # the byte -> unicode table of GPT-2/CLIP byte-level BPE
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def build_clip_tokenizer(words, model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP tokenizer whose vocabulary holds each of ``words`` as one token.

    The merges are learnt by ``tokenizers``' BPE trainer on the word list (with
    CLIP's ``</w>`` end-of-word suffix and byte alphabet), so they are
    consistent: every listed word tokenizes to a single token.
    """
    words = sorted({w.lower() for w in words})
    symbols = list(_byte_symbols())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        initial_alphabet=symbols,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(words, trainer)
    learnt = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    for tok in symbols + [s + "</w>" for s in symbols] + sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
