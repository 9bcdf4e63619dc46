"""`dsv2 serve`: an OpenAI-compatible HTTP server over one engine loop thread (FastAPI + uvicorn).

Needs the `serve` extra: `pip install 'dsv2[serve]'`.
"""

from dsv2.serve.app import ServerState, create_app
from dsv2.serve.chat import DEFAULT_TEMPLATE, ChatTemplate

__all__ = ["ServerState", "create_app", "ChatTemplate", "DEFAULT_TEMPLATE"]
