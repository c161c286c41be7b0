"""Clopos Open API v2: the async client, its HTTP transport and the tenant rate budget."""

from app.clopos.budget import BudgetState, LocalRateBudget, RateBudget
from app.clopos.client import CloposClient, OrdersPage
from app.clopos.transport import make_http_client

__all__ = [
    "BudgetState",
    "CloposClient",
    "LocalRateBudget",
    "OrdersPage",
    "RateBudget",
    "make_http_client",
]
