"""``save_pretrained(dir)`` / ``from_pretrained(dir)`` for every network: ``config.json`` + ``model.safetensors``.

One piece of code for all model directories (VAE, UNet, the CLIP towers). A class adapts it through three
hooks: :meth:`PretrainedMixin.config_dict` (what ``config.json`` holds), :meth:`PretrainedMixin.config_from_dict`
(how it is read back) and :meth:`PretrainedMixin.select_weights` (which stored tensors it takes, e.g. the
text tower out of a whole CLIP). Loading is strict and every problem is one-line ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from ..io_utils import atomic_path, read_json_object, write_json

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


# Random fills a module's constructor may run on its fresh weights: torch.nn.init's and the tensor methods.
_FILLS = frozenset([f for n, f in vars(torch.nn.init).items() if n.endswith("_") and not n.startswith("_")] +
                   [getattr(torch.Tensor, n) for n in ("normal_", "uniform_", "fill_", "zero_", "exponential_",
                                                       "geometric_", "log_normal_", "cauchy_", "bernoulli_",
                                                       "random_")])


class _NoFillsOnMeta(TorchFunctionMode):
    """Skips random and constant fills of meta tensors: they compute nothing, but torch runs ``normal_`` on
    meta through a reference implementation whose first call imports ``torch._dynamo``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FILLS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))  # nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextmanager
def build_on_meta() -> Iterator[None]:
    """Build modules on the meta device, for weights assigned from a checkpoint right after: no memory, and
    no initialisation (which would import ``torch._dynamo`` for ``normal_``: 2.5 s of every command's start
    on a 2-core CPU)."""
    with torch.device("meta"), _NoFillsOnMeta():
        yield


def strict_load(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)``; a mismatch is one line: ``{what} does not fit <class> ...``.

    Tensors are assigned (not copied) into a module built on the meta device.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): {_first(unexpected)}")
    if wrong:
        parts.append(f"shape mismatch {'; '.join(wrong[:3])}")
    if parts:
        raise ValueError(f"{what} does not fit {type(module).__name__} with this configuration: {'; '.join(parts)}")
    module.load_state_dict(state_dict, strict=True, assign=any(p.is_meta for p in own.values()))


def read_weights(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a corrupt or truncated file, or one whose weights hold NaN or
    Inf (overwritten bytes the format cannot notice), is a one-line ``ValueError``."""
    try:
        state = load_file(path, device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}): copy or convert the model again") from None
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{path} is damaged: {len(bad)} weight tensor(s) hold NaN or Inf ({_first(bad)}): copy "
                         f"or convert the model again")
    return state


class PretrainedMixin:
    """Adds directory save/load to an ``nn.Module`` built as ``cls(config)`` from a ``config_class``."""

    config_class: type

    # ------------------------------------------------------------------------------------ hooks
    def config_dict(self) -> dict[str, Any]:
        """The JSON object written as ``config.json``: the config's own ``to_dict()`` where it has one (the
        CLIP configs, which mirror ``transformers``'), else the class name + the config's fields."""
        if hasattr(self.config, "to_dict"):
            return self.config.to_dict()
        return {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any], path: str):
        """``config.json``'s object -> a ``config_class``: its own ``from_dict`` where it has one, else
        checked here (same class name, no unknown keys)."""
        if hasattr(cls.config_class, "from_dict"):
            return cls.config_class.from_dict(raw)
        name = raw.pop("_class_name", cls.__name__)
        if name != cls.__name__:
            raise ValueError(f"{path} describes a {name}, not a {cls.__name__}")
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise ValueError(f"{path} has unknown settings {unknown} for {cls.__name__}")
        return cls.config_class(**raw)

    @classmethod
    def select_weights(cls, config, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The (config, tensors) this class loads from what is stored (default: all, unchanged)."""
        return config, state

    # ------------------------------------------------------------------------------------ I/O
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``model.safetensors`` and ``config.json`` (each atomically) into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(os.path.join(directory, WEIGHTS_NAME)) as tmp:
            save_file(state, tmp, metadata={"format": "pt"})
        write_json(os.path.join(directory, CONFIG_NAME), self.config_dict())

    @classmethod
    def load_config(cls, directory: str | os.PathLike):
        """The ``config_class`` stored in ``directory/config.json``."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory} does not exist: it should be a model directory of a {cls.__name__}")
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: {directory} is not a model directory of a {cls.__name__}")
        try:
            return cls.config_from_dict(read_json_object(path, "model config"), path)
        except TypeError as err:
            raise ValueError(f"{path}: invalid {cls.__name__} settings ({err})") from None
        except ValueError as err:  # a setting out of range: say which file holds it
            raise ValueError(str(err) if path in str(err) else f"{path}: {err}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None):
        """Build the network from ``config.json`` and load ``model.safetensors`` strictly; in eval mode."""
        config = cls.load_config(directory)
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the model directory has no weights")
        config, state = cls.select_weights(config, read_weights(path, device))
        try:
            with build_on_meta():
                model = cls(config)
        except ValueError as err:  # settings the network cannot be built with: name the file they came from
            raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {err}") from None
        strict_load(model, state, path)
        unset = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if unset:  # a tensor no checkpoint holds (a non-persistent buffer) would stay without values
            raise ValueError(f"{cls.__name__} keeps {_first(unset)} out of its checkpoint, so loading from "
                             f"{path} leaves them without values")
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()
