"""``save_pretrained(dir)`` / ``from_pretrained(dir)`` for networks: ``config.json`` + ``model.safetensors``."""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_path, write_json

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class PretrainedMixin:
    """Adds directory save/load to an ``nn.Module`` whose ``self.config`` is a ``config_class`` dataclass."""

    config_class: type

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        config = {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_json(os.path.join(directory, CONFIG_NAME), config)

    @classmethod
    def load_config(cls, directory: str | os.PathLike):
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: not a {cls.__name__} model directory")
        with open(path) as f:
            raw = json.load(f)
        name = raw.pop("_class_name", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"{path} describes a {name}, not a {cls.__name__}")
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f"{path} has unknown settings {unknown} for {cls.__name__}")
        return cls.config_class(**raw)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None):
        """Build the network from ``config.json`` and load ``model.safetensors`` with ``strict=True``."""
        config = cls.load_config(directory)
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the model directory has no weights")
        with torch.device("meta"):
            model = cls(config)
        state = load_file(path, device=str(device))
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ValueError(f"{path} does not fit the {cls.__name__} in {CONFIG_NAME}: "
                             f"{' '.join(s.strip() for s in first[:3])}") from None
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()
