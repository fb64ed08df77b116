"""The project's 3D CLIP as an evaluation network: volume features for the Fréchet distance, and prompt <->
volume alignment (CLIP score, text -> volume retrieval recall).

Volumes reach the volume tower as in ``python -m text2ct_engine.train clip``: HU clipped to [-1000, 1000]
and mapped to [0, 1], optionally resampled to a spacing, then resized (or cropped/padded) to the size the
tower was trained at (recorded in ``preprocessor.json``, else its ``image_size``) and laid out (1, 1, Z, Y, X).
Features for the Fréchet distance are the tower's pooled output before the projection (``hidden_size``
wide); the CLIP score is the mean cosine similarity of each prompt's text embedding with its own volume's
embedding (in [-1, 1]; CLIPScore's 100 x max(cos, 0) rescaling is not applied).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import preprocess
from ..io_utils import read_json_object
from ..models import CLIP3D
from ..text import check_text_side
from ..tokenizer import CLIPTokenizer
from ..train.clip import clip_dir_of, find_tokenizer, volume_layout
from ..train.common import TruncationNote
from .retrieval import retrieval_recall


@dataclass
class VolumeInput:
    """How a HU volume becomes the volume tower's input (``train clip``'s ``--size/--spacing/--resize``)."""

    size: tuple[int, int, int]  # voxels (x, y, z)
    spacing: tuple[float, float, float] | None = None
    resize: str = "resize"

    def __call__(self, hu: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
        """(X, Y, Z) HU in RAS+ order -> (1, 1, Z, Y, X) in [0, 1]."""
        affine = np.diag([*map(float, spacing), 1.0])
        vol, _ = preprocess(hu, affine, self.spacing, self.size, self.resize)
        return volume_layout(vol[None])


def load_clip(path: str, tokenizer: str | None = None, device: str | torch.device = "cpu"
              ) -> tuple[CLIP3D, CLIPTokenizer]:
    """A CLIP3D (``train clip``'s ``OUT/model`` or its ``clip/``) and its tokenizer (given, or beside it)."""
    if not os.path.isdir(path):
        raise ValueError(f"--clip {path} is not a directory: give the CLIP3D that python -m text2ct_engine.train "
                         f"clip writes to OUT/model")
    directory = clip_dir_of(path)
    config = os.path.join(directory, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"--clip {path} is not a CLIP3D directory (no config.json): give OUT/model of python -m "
                         f"text2ct_engine.train clip")
    if "vision_config" not in read_json_object(config, "model config"):
        raise ValueError(f"--clip {path} is not a CLIP3D: it has no volume tower (a text tower alone cannot score "
                         f"volumes); train one with python -m text2ct_engine.train clip")
    model = CLIP3D.from_pretrained(directory, device=device)
    try:
        tok_path = find_tokenizer(tokenizer, directory)
    except ValueError:
        if tokenizer is not None:
            raise
        raise ValueError(f"no tokenizer for --clip {path}: none in it or beside it; pass --tokenizer "
                         f"tokenizer.json") from None
    tok = CLIPTokenizer.from_file(tok_path, context_length=model.config.text_config.max_position_embeddings)
    check_text_side(model.text_tower(), tok, f"--clip {path}")
    return model.eval(), tok


def volume_input(model: CLIP3D, spacing: Sequence[float] | None = None, resize: str | None = None,
                 recorded: dict | None = None) -> VolumeInput:
    """The input recipe of ``model``'s volume tower: ``spacing``/``resize`` as given, else as ``recorded`` by
    ``train clip`` in the CLIP directory, else as stored / "resize"; the size as recorded (the one it was
    trained at: ``train clip --init/--resume --size`` may differ from ``image_size``), else its ``image_size``
    (z, y, x)."""
    recorded = recorded or {}
    spacing = spacing if spacing is not None else recorded.get("spacing")
    resize = resize or recorded.get("resize") or "resize"
    if resize not in ("resize", "crop_pad"):
        raise ValueError(f"--clip-resize must be resize or crop_pad, got {resize!r}")
    if spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"--clip-spacing must be three positive numbers (mm), got {tuple(spacing)}")
    return VolumeInput(_recorded_size(model, recorded.get("size")),
                       tuple(float(s) for s in spacing) if spacing else None, resize)  # type: ignore[arg-type]


def _recorded_size(model: CLIP3D, size: Sequence[int] | None) -> tuple[int, int, int]:
    """The recorded (x, y, z) input size, checked against the tower's patch; the tower's own without one."""
    vision = model.config.vision_config
    if size is None:
        return tuple(int(s) for s in vision.image_size[::-1])  # type: ignore[return-value]
    patch = tuple(vision.patch_size)[::-1]
    if (not isinstance(size, (list, tuple)) or len(size) != 3
            or any(not isinstance(s, int) or s < 1 or s % p for s, p in zip(size, patch))):
        raise ValueError(f"the CLIP's preprocessor.json records size {size!r}: it must be three multiples of the "
                         f"volume tower's patch {patch} (x, y, z); fix or delete that file")
    return tuple(size)  # type: ignore[return-value]


@torch.no_grad()
def volume_features(model: CLIP3D, volume: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features (B, hidden), L2-normalised embeddings (B, P)) of volumes (B, 1, Z, Y, X), float64."""
    device = next(model.parameters()).device
    pooled = model.vision_model(volume.to(device, torch.float32)).pooler_output
    embeds = F.normalize(model.visual_projection(pooled), dim=-1)
    return pooled.double().cpu().numpy(), embeds.double().cpu().numpy()


@torch.no_grad()
def text_embeddings(model: CLIP3D, tokenizer: CLIPTokenizer, texts: Sequence[str], batch_size: int = 16,
                    log=print, note: TruncationNote | None = None) -> np.ndarray:
    """(N, P) L2-normalised text embeddings; long reports are truncated (one note, or none more if ``note``,
    shared with other calls, was given)."""
    device = next(model.parameters()).device
    note, out = note or TruncationNote(log), []
    for i in range(0, len(texts), batch_size):
        with note.watch():
            tokens = tokenizer.encode(list(texts[i:i + batch_size]), allow_empty=True).to(device)
        out.append(model.encode_text(tokens.input_ids, tokens.attention_mask).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim))


def alignment_scores(text_embeds: np.ndarray, volume_embeds: np.ndarray) -> dict:
    """CLIP score (mean cosine of matching rows) and text -> volume recall@1/@5 over the set."""
    t = torch.as_tensor(np.asarray(text_embeds, np.float64))
    v = torch.as_tensor(np.asarray(volume_embeds, np.float64))
    cos = (F.normalize(t, dim=-1) * F.normalize(v, dim=-1)).sum(-1)
    return {"clip_score": float(cos.mean()), "clip_score_std": float(cos.std()) if len(cos) > 1 else 0.0,
            **retrieval_recall(t, v), "n": int(t.shape[0])}
