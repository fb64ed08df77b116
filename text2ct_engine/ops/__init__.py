"""Public ops of the engine. Every GroupNorm and attention in the models goes through these two calls."""
from .attention import attention, choose_attention_backend
from .backend import BACKENDS, backend, requested_backend
from .group_norm import choose_group_norm_backend, group_norm

__all__ = ["attention", "group_norm", "backend", "requested_backend", "BACKENDS",
           "choose_attention_backend", "choose_group_norm_backend"]
