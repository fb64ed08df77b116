"""text2ct_engine: text-to-CT 3D latent diffusion on custom Triton kernels, in little GPU memory."""
__version__ = "0.1.0"
