from .unet import DiffusionUNet, DiffusionUNetConfig
from .vae import AutoencoderKL, AutoencoderKLConfig
