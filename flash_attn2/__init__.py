"""flash_attn2: exact attention for PyTorch on hand-written CuTe kernels, after FlashAttention-2."""

from .interface import built_head_dims, flash_attn_func

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "built_head_dims", "__version__"]
