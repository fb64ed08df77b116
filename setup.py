"""Install text2ct_engine; the top-level ``kernels/`` folder becomes ``text2ct_engine.kernels``.

CPU machines: ``pip install torch==2.13.0 -e ".[test]"`` (the pinned torch resolves to the CPU wheel where
one is offered locally, to the CUDA wheel from PyPI elsewhere). Any torch >= 2.4 works.
"""
from setuptools import setup

setup(
    name="text2ct_engine",
    version="0.1.0",
    description="Memory-optimised Triton engine for text-to-CT 3D latent diffusion (MAISI VAE + UNet, 3D CLIP)",
    python_requires=">=3.10",
    packages=[
        "text2ct_engine",
        "text2ct_engine.ops",
        "text2ct_engine.models",
        "text2ct_engine.tiling",
        "text2ct_engine.memory",
        "text2ct_engine.data",
        "text2ct_engine.train",
        "text2ct_engine.evaluate",
        "text2ct_engine.kernels",
        "text2ct_engine.csrc",
    ],
    package_dir={"text2ct_engine.kernels": "kernels", "text2ct_engine.csrc": "csrc"},
    # the built-in phantom demo model (python -m text2ct_engine.sample without --model)
    package_data={"text2ct_engine.csrc": ["*.cpp"],
                  "text2ct_engine": ["assets/phantom_model/*.json", "assets/phantom_model/*/*.json",
                                     "assets/phantom_model/*/*.safetensors"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy>=1.24",
        "nibabel>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "tqdm>=4.60",
        "pillow>=9.0",
    ],
    extras_require={
        "test": ["pytest>=7", "monai>=1.5", "einops>=0.6", "transformers>=4.40"],
        "gpu": ["xformers>=0.0.28"],
    },
)
