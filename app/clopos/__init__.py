"""Clopos Open API v2: the async client (``app.clopos.client``), the tenant rate budget
(``app.clopos.budget``) and its timestamps (``app.clopos.timestamps``).

Nothing is imported here: the store's writer process imports ``app.clopos.timestamps``
(through ``app.snapshot``), and the client would bring aiohttp, pydantic and more into
that process, about 25 MB of memory for nothing.
"""
