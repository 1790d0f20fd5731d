"""flash_attn2: exact attention for PyTorch on hand-written CuTe kernels, after FlashAttention-2."""

from ._checks import set_value_checks
from ._ops import built_head_dims, dropout_keep_mask
from .interface import flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from .kvcache import flash_attn_with_kvcache
from .varlen import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

__version__ = "0.2.0"
__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache",
           "built_head_dims",
           "dropout_keep_mask", "set_value_checks", "__version__"]
