"""Tiny T5 and CLIP tokenizers built offline, for tests (text encoders, pipeline, download-and-convert).

Built with transformers' own tokenizer classes (backed by the `tokenizers` library: no sentencepiece, no download),
so they run the same normalisation / pre-tokenisation / post-processing as the real ones, only with a small
vocabulary, and `save_pretrained(dir)` writes `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json`, which `T5Tokenizer/CLIPTokenizer/AutoTokenizer.from_pretrained(dir)` load back.

* `build_t5_tokenizer(dir, vocab_size=96)`: unigram over "▁"-prefixed words, lower-case letters (and A, F, P, S:
  "A ...", "24 FPS."), digits and punctuation;
  ids as google/t5-v1_1: `<pad>` 0, `</s>` 1, `<unk>` 2 (anything else out of vocabulary); no sentinel tokens;
  `</s>` appended, padding with `<pad>` (the t5_tiny case's conventions, vocab 96).
* `build_t5_spiece_folder(dir, vocab_size=96)`: the same pieces as a sentencepiece `spiece.model` +
  `tokenizer_config.json`, the form google/t5-v1_1-xxl ships (no tokenizer.json; needs the sentencepiece package);
* `build_clip_tokenizer(dir, vocab_size=120)`: byte-level BPE (end-of-word `</w>`, lower case) over letters,
  digits, punctuation and merged words; `<|startoftext|>` = vocab_size - 2 and `<|endoftext|>` = vocab_size - 1,
  the highest ids, as in openai/clip-vit-large-patch14 (the legacy pooling takes the argmax id = the first EOT);
  padding with `<|endoftext|>` (the clip_tiny case's conventions, vocab 120).

Both fill the vocabulary to exactly `vocab_size` tokens (spare merges / pieces), so `len(tokenizer) == vocab_size`
and every id fits an embedding of that size. Usage: `from tiny_tokenizers import build_t5_tokenizer` (tests/ is on
pytest's path).
"""

from __future__ import annotations

import itertools
import shutil
import string
from pathlib import Path

WORDS = ["a", "the", "of", "in", "on", "and", "with", "at", "red", "fox", "cat", "dog", "sea", "rain", "raining",
         "snow", "city", "night", "street", "running", "walking", "fps", "motion", "score", "sunset", "over", "ocean"]
PUNCT = list(".,!?'-:")
CLIP_WORDS = ["the", "red", "fox", "sea", "rain", "snow", "fps", "motion", "score"]


def build_t5_tokenizer(folder, vocab_size: int = 96, model_max_length: int = 512):
    """Write a tiny T5 tokenizer into `folder`; returns it (a `transformers.T5Tokenizer`)."""
    import transformers

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    base = [("▁", -2.0)] + [(c, -6.0) for c in string.ascii_lowercase + "AFPS" + string.digits]
    base += [(p, -5.0) for p in PUNCT]
    words = [(f"▁{w}", -3.0) for w in WORDS] + [("▁FPS", -3.0), ("▁FPS.", -2.5)]
    pieces = specials + base + words
    spare = (f"▁{a}{b}" for a, b in itertools.product(string.ascii_lowercase, repeat=2))
    while len(pieces) < vocab_size:
        pieces.append((next(spare), -9.0))
    if len(pieces) > vocab_size:
        raise ValueError(f"build_t5_tokenizer: needs vocab_size >= {len(pieces)} (got {vocab_size})")
    tok = transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok


def build_t5_spiece_folder(folder, vocab_size: int = 96, model_max_length: int = 512) -> Path:
    """The form google/t5-v1_1-xxl ships: `spiece.model` (a sentencepiece unigram model, the same pieces as
    `build_t5_tokenizer`) + `tokenizer_config.json`, no tokenizer.json; transformers builds the tokenizer from it
    (that needs the `sentencepiece` package). Returns the spiece.model path."""
    import json

    from sentencepiece import sentencepiece_model_pb2 as pb

    tok = build_t5_tokenizer(Path(folder) / ".vocab", vocab_size, model_max_length)
    pieces = json.loads(tok.backend_tokenizer.to_str())["model"]["vocab"]
    shutil.rmtree(Path(folder) / ".vocab")
    m = pb.ModelProto()
    for i, (piece, score) in enumerate(pieces):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        p.type = pb.ModelProto.SentencePiece.UNKNOWN if i == 2 else \
            pb.ModelProto.SentencePiece.CONTROL if i < 2 else pb.ModelProto.SentencePiece.NORMAL
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.pad_id, m.trainer_spec.eos_id, m.trainer_spec.unk_id, m.trainer_spec.bos_id = 0, 1, 2, -1
    path = Path(folder) / "spiece.model"
    path.write_bytes(m.SerializeToString())
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0, "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<pad>"}))
    return path


def _word_merges(word: str) -> list[tuple[str, str]]:
    """The left-to-right merges that build `word</w>` from its characters."""
    chars = list(word[:-1]) + [word[-1] + "</w>"]
    merges, cur = [], chars[0]
    for c in chars[1:]:
        merges.append((cur, c))
        cur += c
    return merges


def build_clip_tokenizer(folder, vocab_size: int = 120, model_max_length: int = 77):
    """Write a tiny CLIP tokenizer into `folder`; returns it (a `transformers.CLIPTokenizer`)."""
    import transformers

    # CLIP's pre-tokeniser makes every digit a word of its own and punctuation runs words: those need the
    # end-of-word form only ("...": "." + "." + ".</w>")
    tokens = list(string.ascii_lowercase) + [".", ","] + [s + "</w>" for s in string.ascii_lowercase]
    tokens += [s + "</w>" for s in list(string.digits) + PUNCT]
    merges = []
    for w in CLIP_WORDS:
        for a, b in _word_merges(w):
            if a + b not in tokens:
                tokens.append(a + b)
                merges.append((a, b))
    spare = ((a, b) for a, b in itertools.product(string.ascii_lowercase, repeat=2))
    while len(tokens) < vocab_size - 2:
        a, b = next(spare)
        if a + b not in tokens:
            tokens.append(a + b)
            merges.append((a, b))
    if len(tokens) > vocab_size - 2:
        raise ValueError(f"build_clip_tokenizer: needs vocab_size >= {len(tokens) + 2} (got {vocab_size})")
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = vocab_size - 2
    vocab["<|endoftext|>"] = vocab_size - 1
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges,
                                     model_max_length=model_max_length)
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return tok
