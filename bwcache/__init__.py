"""BWCache: block-wise caching for video diffusion transformers, as diffusers hooks.

    >>> from bwcache import BWCacheConfig, apply_bwcache
    >>> handle = apply_bwcache(pipe, BWCacheConfig(threshold=0.15))
    >>> frames = pipe(prompt).frames[0]
    >>> print(handle.summary())
"""

from .resources import package_version
from .blocks import register_block
from .config import BWCacheConfig
from .parallel import enable_context_parallel
from .plan import plan_memory
from .apply import BWCacheHandle, apply_bwcache, cached, get_bwcache_handle, remove_bwcache
# `bwcache.calibrate` is the function; its module is `bwcache.calibrate.core` (import from `bwcache.calibrate`).
from .calibrate import Calibration, calibrate
from .schedule import estimate_blockwise_schedule, paper_schedule, predict_schedule
from .trace import Trace, summarize

__version__ = package_version()

__all__ = [
    "BWCacheConfig",
    "BWCacheHandle",
    "Calibration",
    "Trace",
    "apply_bwcache",
    "cached",
    "calibrate",
    "enable_context_parallel",
    "estimate_blockwise_schedule",
    "get_bwcache_handle",
    "paper_schedule",
    "plan_memory",
    "predict_schedule",
    "register_block",
    "remove_bwcache",
    "summarize",
]
