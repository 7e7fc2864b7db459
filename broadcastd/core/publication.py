"""The former name of ``broadcastd.core.publish_forms``, for imports not moved yet."""

from broadcastd.core.publish_forms import Item

__all__ = ["Item"]
