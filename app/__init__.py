"""clopos-hydrator: turns thin Clopos notifications into full orders, delivered reliably."""

__version__ = "0.1.0"
