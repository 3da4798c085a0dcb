"""peftjax's version, in the lowest layer so that any module can read it."""

__version__ = "0.1.0"
