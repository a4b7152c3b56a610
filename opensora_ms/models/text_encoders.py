"""Upstream's text conditioning on the MindSpore ports: prompt suffixes, tokenisation and the encoder call exactly
as Open-Sora 2.0's `HFEmbedder` does them (SPEC §a "Text encoders", §f.2; docs/text_encoders.md).

A text-encoder folder is what `msconv download-and-convert` writes per encoder (docs/download.md): the Hugging Face
`config.json` and tokenizer files, byte for byte, beside the converted weights (`*.safetensors` in the port's names,
`mappings/t5_encoder.yaml` / `clip_text.yaml`). The tokenizer is transformers' own (`T5Tokenizer(legacy=True)`,
`CLIPTokenizer`), loaded from that folder as upstream loads it; transformers' tokenizers do not import torch.

Upstream's call: T5 pads/truncates to 512 tokens and CLIP to 77 (`padding="max_length"`, `truncation=True`), and
both run with **no attention mask** (T5's padding is attended); T5 gives `last_hidden_state` (B, 512, 4096) = `txt`,
CLIP `pooler_output` (B, 768) = `y_vec`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor

from converter.errors import UserError

__all__ = ["T5_MAX_LENGTH", "CLIP_MAX_LENGTH", "TextEncoderError", "TextEncoder", "load_text_encoder",
           "encode_prompts", "add_fps_info", "add_motion_score", "video_prompt", "numpy_f32"]

T5_MAX_LENGTH = 512   # 256px.py / 768px.py: t5 max_length
CLIP_MAX_LENGTH = 77  # clip max_length (= CLIP's context)


class TextEncoderError(UserError):
    """A text-encoder folder that cannot be used (missing/foreign files, a tokenizer that does not fit the model)."""


# ---------------------------------------------------------------------------------------------- prompt rules
_FPS_AT_END = re.compile(r"\d+ FPS\.$")


def add_fps_info(text: str, fps: int = 24) -> str:
    """upstream `add_fps_info_to_text` for one prompt: strip, end with ".", then append " {fps} FPS." unless the
    prompt already ends with "<digits> FPS."."""
    text = text.strip()
    if not text.endswith("."):
        text += "."
    if not _FPS_AT_END.search(text):
        text += f" {fps} FPS."
    return text


def add_motion_score(text: str, motion_score) -> str:
    """upstream `add_motion_score_to_text` for one prompt: append " {motion_score} motion score."; upstream's
    "dynamic" asks an OpenAI model for the score (`prompt_refine.py`), which this port does not do."""
    if motion_score == "dynamic":
        raise TextEncoderError("motion score 'dynamic' asks OpenAI's API for a score (upstream prompt_refine.py); "
                               "pass a number")
    return f"{text} {motion_score} motion score."


def video_prompt(text: str, fps: int = 24, motion_score=4) -> str:
    """The prompt upstream encodes for a video (`inference.py`): fps suffix (fps_save), then the motion score when
    the config sets one (`motion_score=None`: no score). "raining, sea" -> "raining, sea. 24 FPS. 4 motion score."
    The negative prompt and the T2I stage's prompt are encoded as given (no suffix)."""
    text = add_fps_info(text, fps)
    return text if motion_score is None else add_motion_score(text, motion_score)


# ---------------------------------------------------------------------------------------------- encoders
@dataclass
class TextEncoder:
    """One loaded encoder: transformers' tokenizer + the MindSpore port, called as upstream calls it."""

    kind: str                 # "t5" | "clip"
    model: object             # opensora_ms.models.t5.T5EncoderModel | clip.CLIPTextModel
    tokenizer: object         # transformers' T5Tokenizer / CLIPTokenizer
    max_length: int
    folder: str = ""
    jit: bool = False
    _compiled: object = field(default=None, repr=False)

    @property
    def output_key(self) -> str:
        return "pooler_output" if self.kind == "clip" else "last_hidden_state"

    def tokenize(self, texts) -> np.ndarray:
        """(B, max_length) int64 ids: upstream's tokenizer call (truncation, padding to max_length)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_length=False,
                             return_overflowing_tokens=False, padding="max_length", return_tensors="np")
        return np.asarray(enc["input_ids"], dtype=np.int64)

    def encode_ids(self, ids) -> Tensor:
        """The encoder's output for token ids, with no attention mask, in the model's dtype."""
        from .t5 import as_ids, make_jit

        ids = as_ids(ids)
        if self.jit:
            if self._compiled is None:
                self._compiled = make_jit(self.model, False)
            out = self._compiled(ids)
        else:
            out = self.model(ids, None, False)
        return out[self.output_key]

    def __call__(self, texts) -> Tensor:
        return self.encode_ids(self.tokenize(texts))


def _read_config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        raise TextEncoderError(f"{p}: no such file (a text-encoder folder holds the Hugging Face config.json)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TextEncoderError(f"{p}: not a readable JSON config ({e.__class__.__name__})") from None
    if not isinstance(d, dict):
        raise TextEncoderError(f"{p}: a config is a JSON object")
    return d


def _kind_of(d: dict, folder: Path) -> str:
    mt = d.get("model_type")
    if mt == "t5":
        return "t5"
    if mt in ("clip", "clip_text_model"):
        return "clip"
    raise TextEncoderError(f"{folder / 'config.json'}: model_type {mt!r} is neither a T5 ('t5') nor a CLIP text "
                           "model ('clip', 'clip_text_model')")


def _tokenizer(kind: str, folder: Path, max_length: int):
    files = {p.name for p in folder.iterdir()}
    need = ("tokenizer.json", "spiece.model") if kind == "t5" else ("tokenizer.json", "vocab.json")
    if not files & set(need):
        # transformers would build an empty tokenizer from the special tokens alone: refuse instead
        raise TextEncoderError(f"{folder}: no tokenizer files ({' or '.join(need)}); copy them from the Hugging "
                               "Face folder beside the converted weights")
    import transformers

    try:
        if kind == "t5":
            return transformers.T5Tokenizer.from_pretrained(str(folder), max_length=max_length, legacy=True)
        return transformers.CLIPTokenizer.from_pretrained(str(folder), max_length=max_length)
    except (OSError, ValueError, TypeError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise TextEncoderError(f"{folder}: transformers cannot load the {kind} tokenizer ({msg})") from None


def load_text_encoder(folder, kind: str | None = None, dtype=None, max_length: int | None = None,
                      jit: bool = False) -> TextEncoder:
    """The encoder of a text-encoder folder (module docstring). `kind` ("t5"/"clip") defaults to the config's
    model_type; `dtype` to the op layer's model dtype (fp32 on CPU, bf16 on Ascend); `max_length` to upstream's
    (512 / 77). Raises `TextEncoderError` / `opensora_ms.loading.LoadError` (one line, naming the file/key)."""
    from converter.sources import Source
    from opensora_ms.loading import load_strict

    folder = Path(folder)
    if not folder.is_dir():
        raise TextEncoderError(f"{folder}: not a directory (expected a text-encoder folder: config.json, "
                               "tokenizer files, converted *.safetensors)")
    d = _read_config(folder)
    found = _kind_of(d, folder)
    if kind is not None and kind != found:
        raise TextEncoderError(f"{folder / 'config.json'}: a {found} config, but a {kind} encoder was asked for")
    if found == "clip" and isinstance(d.get("text_config"), dict):   # a full CLIPModel config: the text tower's
        d = d["text_config"]
    from . import clip as C
    from . import t5 as T

    mod = T if found == "t5" else C
    try:
        cfg = (T.T5Config if found == "t5" else C.CLIPTextConfig).from_dict(d)
    except (ValueError, TypeError) as e:
        raise TextEncoderError(f"{folder / 'config.json'}: {e}") from None
    keys = Source(folder).inventory()
    foreign = [k for k in ("shared.weight", "text_model.embeddings.token_embedding.weight") if k in keys]
    if foreign:
        mapping = "t5_encoder" if found == "t5" else "clip_text"
        raise TextEncoderError(f"{folder}: holds Hugging Face weights ({foreign[0]}), not converted ones; convert them "
                               f"first: msconv convert {folder} --mapping {mapping} --out DIR (or use msconv "
                               "download-and-convert)")
    max_length = max_length or (T5_MAX_LENGTH if found == "t5" else CLIP_MAX_LENGTH)
    tok = _tokenizer(found, folder, max_length)
    if len(tok) > cfg.vocab_size:
        raise TextEncoderError(f"{folder}: the tokenizer has {len(tok)} tokens but the model's vocab_size is "
                               f"{cfg.vocab_size} (config.json): they are not a pair")
    net = mod.build(cfg, dtype=dtype, init=False)
    load_strict(net, str(folder))
    return TextEncoder(found, net, tok, int(max_length), str(folder), jit)


def encode_prompts(texts, t5: TextEncoder, clip: TextEncoder) -> dict[str, Tensor]:
    """`txt` = T5 `last_hidden_state` (B, 512, d) and `y_vec` = CLIP `pooler_output` (B, d) of the texts, as
    upstream's `prepare()` computes them (texts exactly as given: add the suffixes with `video_prompt` first; the
    CFG batch [prompt, neg, neg] is the caller's)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise TextEncoderError("encode_prompts: no text to encode")
    return {"txt": t5(texts), "y_vec": clip(texts)}


def numpy_f32(t: Tensor) -> np.ndarray:
    """A (possibly bf16) Tensor as numpy float32 (exact upcast)."""
    return (t.astype(ms.float32) if t.dtype in (ms.bfloat16, ms.float16) else t).asnumpy()
