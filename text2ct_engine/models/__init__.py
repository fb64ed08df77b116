from .unet import DiffusionUNet, DiffusionUNetConfig
from .vae import AutoencoderKL, AutoencoderKLConfig
from .clip_text import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTextTransformer, convert_text2ct_clip_state_dict
from .clip_vision3d import CLIPVisionModel3D, VisionConfig3D, VisionTransformer3D
from .clip3d import CLIP3D, CLIP3DConfig, clip_contrastive_loss
