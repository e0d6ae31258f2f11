"""The token cache: in-memory LRU with single-flight, and the seam for a shared store."""

from gateway.cache.cache import TokenCache
from gateway.cache.entry import CachedToken, SharedStore
from gateway.cache.singleflight import SingleFlight

__all__ = ["CachedToken", "SharedStore", "SingleFlight", "TokenCache"]
