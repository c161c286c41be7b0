"""The sandbox Clopos as a module-level ASGI app, so benchmarks can run it in its own process
(off the load generator's interpreter) with ``uvicorn benchmarks.sandbox_app:app``."""

from __future__ import annotations

from app.sandbox import SandboxState, create_sandbox_app

app = create_sandbox_app(SandboxState(seed_orders=300, tenant_limit_per_minute=1_000_000))
