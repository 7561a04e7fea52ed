"""``safeinfer serve``: an OpenAI-compatible HTTP server with SafeInfer per request.

:func:`create_app` builds the FastAPI app over one engine thread (:class:`~.scheduler.Scheduler`), which decodes
every client's requests together through the one decode loop; :func:`run` serves it with uvicorn and drains on
Ctrl-C or SIGTERM; :func:`start` serves it from a thread of this process. :mod:`.protocol` is the wire format (pure).
"""

from .app import create_app, run, start
from .scheduler import Scheduler

__all__ = ["create_app", "run", "start", "Scheduler"]
