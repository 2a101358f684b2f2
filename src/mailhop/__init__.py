"""mailhop: a store-and-forward SMTP relay for cross-border mail chains."""

__version__ = "0.1.0"
