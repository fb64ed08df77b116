"""Noise schedulers: rectified flow (Text2CT, MAISI v2) and DDIM for epsilon-prediction models.

Both follow MONAI's schedulers step for step (``RFlowScheduler``, ``DDIMScheduler``), so weights trained with
MONAI sample the same here. Timesteps live on [0, num_train_timesteps]; t = T is pure noise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) per-sample values -> (N, 1, ..., 1) broadcastable against ``like``."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def timestep_transform(t, input_numel, base_numel: int = 32 ** 3, scale: float = 1.0,
                       num_train_timesteps: int = 1000, spatial_dim: int = 3):
    """Shift timesteps towards the noisy end for volumes larger than ``base_numel``.

    With r = scale * (input_numel / base_numel) ** (1 / spatial_dim) and s = t / T: s' = r s / (1 + (r - 1) s).
    """
    s = t / num_train_timesteps
    ratio = (input_numel / base_numel) ** (1.0 / spatial_dim) * scale
    return ratio * s / (1 + (ratio - 1) * s) * num_train_timesteps


@dataclass
class RFlowConfig:
    num_train_timesteps: int = 1000
    use_discrete_timesteps: bool = False
    sample_method: str = "uniform"  # or "logit-normal"
    loc: float = 0.0
    scale: float = 1.0
    use_timestep_transform: bool = True
    transform_scale: float = 1.0
    steps_offset: int = 0
    base_img_size_numel: int = 32 ** 3
    spatial_dim: int = 3


class RFlowScheduler:
    """Rectified flow: x_t = (1 - t/T) x0 + (t/T) noise; the model predicts the velocity x0 - noise.

    ``step`` is an Euler step from t to the next timestep. ``set_timesteps`` spaces ``n`` steps uniformly
    from T down, shifted by :func:`timestep_transform` for the latent's size, and (as MONAI does) rounded
    through float16.

    Two things to know: (1) as in MONAI, ``step`` truncates the timestep it goes to (``int(next_timestep)``)
    while the fp16 timesteps have fractions, so the Euler steps add up to slightly more than the whole flow
    (1.0087 of it for a 128x128x32 latent at 30 steps, 1.012 for the demo model's 16x16x8): a velocity that
    points at x0 from where the sample is corrects for it, a constant one overshoots by that much. It is the
    sampler the Text2CT weights were evaluated with, so it is kept.
    (2) ``transform_scale`` is applied here, where MONAI accepts it and ignores it (the same at its default 1).
    """

    def __init__(self, config: RFlowConfig | None = None, **kwargs) -> None:
        self.config = config or RFlowConfig(**kwargs)
        if self.config.sample_method not in ("uniform", "logit-normal"):
            raise ValueError(f"sample_method must be 'uniform' or 'logit-normal', got {self.config.sample_method!r}")
        self.num_train_timesteps = self.config.num_train_timesteps
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    def to_dict(self) -> dict:
        return {"_class_name": type(self).__name__, **asdict(self.config)}

    def _transform(self, t, numel, spatial_dim: int):
        c = self.config
        return timestep_transform(t, numel, c.base_img_size_numel, c.transform_scale, c.num_train_timesteps,
                                  spatial_dim)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        keep = 1 - _expand(timesteps.float() / self.num_train_timesteps, noise)
        return keep * original_samples + (1 - keep) * noise

    @staticmethod
    def velocity_target(original_samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model is trained to predict: x0 - noise."""
        return original_samples - noise

    def sample_timesteps(self, x_start: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps for a batch, uniform or logit-normal, shifted for the latent's size."""
        c, n = self.config, x_start.shape[0]
        if c.sample_method == "uniform":
            s = torch.rand(n, generator=generator, device=x_start.device)
        else:
            s = torch.sigmoid(torch.randn(n, generator=generator, device=x_start.device) * c.scale + c.loc)
        t = s * c.num_train_timesteps
        if c.use_discrete_timesteps:
            t = t.long()
        if c.use_timestep_transform:
            t = self._transform(t, float(np.prod(x_start.shape[2:])), x_start.dim() - 2)
        return t

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      input_img_size_numel: int | None = None) -> None:
        c = self.config
        if not 1 <= num_inference_steps <= c.num_train_timesteps:
            raise ValueError(f"steps must lie in [1, {c.num_train_timesteps}], got {num_inference_steps}")
        ts = [(1.0 - i / num_inference_steps) * c.num_train_timesteps for i in range(num_inference_steps)]
        if c.use_discrete_timesteps:
            ts = [int(round(t)) for t in ts]
        if c.use_timestep_transform:
            if input_img_size_numel is None:
                raise ValueError("set_timesteps needs input_img_size_numel (latent D*H*W) for the timestep shift")
            ts = [self._transform(t, input_img_size_numel, c.spatial_dim) for t in ts]
        arr = np.array(ts).astype(np.float16)
        if c.use_discrete_timesteps:
            arr = arr.astype(np.int64)
        self.timesteps = torch.from_numpy(arr).to(device) + c.steps_offset
        self.num_inference_steps = num_inference_steps

    def next_timesteps(self) -> torch.Tensor:
        """The timestep each step goes to: the following one, and 0 after the last."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps first")
        return torch.cat([self.timesteps[1:], torch.zeros(1, dtype=self.timesteps.dtype,
                                                          device=self.timesteps.device)])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             next_timestep=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler step with the predicted velocity; returns (next sample, predicted x0)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps first")
        t = float(timestep)
        if next_timestep is not None:
            dt = (t - int(next_timestep)) / self.num_train_timesteps
        else:
            dt = 1.0 / self.num_inference_steps
        return sample + model_output * dt, sample + model_output * t / self.num_train_timesteps


@dataclass
class DDIMConfig:
    num_train_timesteps: int = 1000
    schedule: str = "linear_beta"  # or "scaled_linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"  # or "sample", "v_prediction"


class DDIMScheduler:
    """DDIM (Song et al. 2021) for models trained with DDPM noise; MONAI ``DDIMScheduler`` semantics."""

    def __init__(self, config: DDIMConfig | None = None, **kwargs) -> None:
        c = self.config = config or DDIMConfig(**kwargs)
        if c.schedule == "linear_beta":
            betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
        elif c.schedule == "scaled_linear_beta":
            betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps,
                                   dtype=torch.float32) ** 2
        else:
            raise ValueError(f"schedule must be 'linear_beta' or 'scaled_linear_beta', got {c.schedule!r}")
        if c.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown prediction_type {c.prediction_type!r}")
        self.num_train_timesteps = c.num_train_timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    def to_dict(self) -> dict:
        return {"_class_name": type(self).__name__, **asdict(self.config)}

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **_) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"steps must lie in [1, {self.num_train_timesteps}], got {num_inference_steps}")
        top = self.num_train_timesteps - 1 - self.config.steps_offset
        ts = torch.linspace(top, 0, num_inference_steps, device=device).round().long()
        self.timesteps = ts + self.config.steps_offset
        self.num_inference_steps = num_inference_steps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = _expand(self.alphas_cumprod.to(original_samples.device)[timesteps.long()], noise)
        return a.sqrt() * original_samples + (1 - a).sqrt() * noise

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``timestep``; returns (previous sample, predicted x0)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps first")
        t = int(timestep)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - b_t ** 0.5 * model_output) / a_t ** 0.5
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a_t ** 0.5 * x0) / b_t ** 0.5
        else:
            x0 = a_t ** 0.5 * sample - b_t ** 0.5 * model_output
            eps = a_t ** 0.5 * model_output + b_t ** 0.5 * sample
        if self.config.clip_sample:
            x0 = x0.clamp(-1, 1)
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var ** 0.5
        prev = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            noise = torch.randn(model_output.shape, generator=generator, device=model_output.device,
                                dtype=model_output.dtype)
            prev = prev + std * noise
        return prev, x0


SCHEDULERS = {"RFlowScheduler": RFlowScheduler, "DDIMScheduler": DDIMScheduler}


def scheduler_from_dict(d: dict):
    """Rebuild a scheduler from ``to_dict()`` output (as stored in ``pipeline.json``)."""
    d = dict(d)
    name = d.pop("_class_name", "RFlowScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name](**d)
