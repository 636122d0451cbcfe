"""Settings from the environment, in one place."""

from config.settings import EMBEDDED, Settings, get_settings

__all__ = ["EMBEDDED", "Settings", "get_settings"]
