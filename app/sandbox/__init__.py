"""A stand-in for the Clopos Open API v2, for tests, demos and `clopos-hydrator sandbox`.

``create_sandbox_app(SandboxState(...))`` gives a FastAPI app serving ``/open-api/v2/...``
(base URL ``<server>/open-api``) and control routes under ``/_sandbox``. The contract is in
notes/sandbox_api.md; the behaviour imitated is shared/clopos-api.md.
"""

from app.sandbox.server import create_sandbox_app
from app.sandbox.state import (
    DEFAULT_BRAND,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_INTEGRATOR_ID,
    CallRecord,
    SandboxState,
)

__all__ = [
    "DEFAULT_BRAND",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_INTEGRATOR_ID",
    "CallRecord",
    "SandboxState",
    "create_sandbox_app",
]
