"""stella-materializer: turns the signed-in user's Stella media jobs into files on disk."""

__version__ = "0.1.0"
