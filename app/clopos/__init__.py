"""Clopos Open API v2: the async client and the tenant rate budget."""

from app.clopos.budget import BudgetState, LocalRateBudget, RateBudget
from app.clopos.client import CloposClient, OrdersPage

__all__ = [
    "BudgetState",
    "CloposClient",
    "LocalRateBudget",
    "OrdersPage",
    "RateBudget",
]
