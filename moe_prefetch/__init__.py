"""moe_prefetch: run Mixture-of-Experts models with experts offloaded to host memory."""
from .config import OffloadConfig, parse_size
from .errors import MoePrefetchError
from .runtime import cache_kwargs, load_model, reset_stats, set_predictor, stats

__all__ = ["MoePrefetchError", "OffloadConfig", "cache_kwargs", "load_model", "parse_size", "reset_stats", "set_predictor", "stats"]
__version__ = "0.1.0"
