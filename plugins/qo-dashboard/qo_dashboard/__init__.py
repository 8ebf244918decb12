"""qo-dashboard: ``qo dashboard``, a web page for a qo queue, served by aiohttp."""

from .app import create_app

__all__ = ["create_app"]
__version__ = "0.1.0"
