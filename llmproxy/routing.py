"""Routing: (path, model) -> the pool of upstream base URLs to use.

Pure logic, no I/O: the proxy asks :class:`Router` where a request goes and
:class:`UpstreamPool` which of its base URLs takes this turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

from llmproxy.config import Config, RouteConfig

__all__ = ["Route", "Router", "UpstreamPool", "extract_model"]


@attrs.define
class UpstreamPool:
    """A set of interchangeable base URLs, picked in round-robin order.

    Attributes:
        name: The route's name for logs and metrics, such as ``/v1/`` for a
            ``target_map`` entry or ``gpt-4`` for a model route.
        urls: The base URLs, without a trailing slash.
        via: How to reach them: ``auto``, ``direct`` or ``proxy``.
        api_key: The upstream credential that replaces the client's.
        auth_header: How ``api_key`` is sent (``bearer``, ``x-api-key``,
            ``api-key``, ``none``).
    """

    name: str
    urls: tuple[str, ...]
    via: str = "auto"
    api_key: str | None = attrs.field(default=None, repr=False)
    auth_header: str = "bearer"
    _turn: int = 0

    def pick(self) -> str:
        """Return the base URL whose turn it is and advance the turn.

        Returns:
            One of :attr:`urls`; successive calls cycle through all of them.
        """
        url = self.urls[self._turn % len(self.urls)]
        self._turn = (self._turn + 1) % len(self.urls)
        return url


@attrs.frozen
class Route:
    """Where one request goes.

    Attributes:
        pool: The upstream pool that serves it.
        path_key: The ``target_map`` key that matched the path.
        model: The model whose route was used, or None when the path's base
            URL was used.
    """

    pool: UpstreamPool
    path_key: str
    model: str | None


def _pool(name: str, route: RouteConfig) -> UpstreamPool:
    return UpstreamPool(
        name=name,
        urls=route.urls,
        via=route.via,
        api_key=route.api_key,
        auth_header=route.auth_header,
    )


class Router:
    """Chooses the upstream pool for a request path and model.

    A path that is a key of ``target_map`` routes there; otherwise the
    longest key ending in ``/`` that prefixes the path. When the request names
    a model that ``model_routes`` knows, that model's pool serves it instead.
    """

    def __init__(
        self,
        target_map: Mapping[str, RouteConfig],
        model_routes: Mapping[str, RouteConfig],
    ) -> None:
        """Build the lookup tables.

        Args:
            target_map: Path (or path prefix ending in ``/``) to route.
            model_routes: Model name to route.
        """
        self._exact: dict[bytes, tuple[str, UpstreamPool]] = {}
        prefixes = []
        for key, route in target_map.items():
            entry = (key, _pool(key, route))
            raw = key.encode("utf-8")
            self._exact[raw] = entry
            if key.endswith("/"):
                prefixes.append((raw, entry))
        prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._prefixes = prefixes
        self._models = {
            name: _pool(name, route) for name, route in model_routes.items()
        }

    @classmethod
    def from_config(cls, config: Config) -> Router:
        """Build a router from a validated config.

        Args:
            config: The configuration.

        Returns:
            A router for its ``target_map`` and ``model_routes``.
        """
        return cls(config.target_map, config.model_routes)

    def route(self, path: bytes, model: str | None) -> Route | None:
        """Find the route for a request.

        Args:
            path: The request path as received, without the query string.
            model: The ``model`` named in the request body, if any.

        Returns:
            The route, or None when no ``target_map`` entry matches the path.
        """
        entry = self._exact.get(path)
        if entry is None:
            for prefix, candidate in self._prefixes:
                if path.startswith(prefix):
                    entry = candidate
                    break
            else:
                return None
        path_key, pool = entry
        if model is not None:
            model_pool = self._models.get(model)
            if model_pool is not None:
                return Route(pool=model_pool, path_key=path_key, model=model)
        return Route(pool=pool, path_key=path_key, model=None)


def extract_model(body: bytes) -> str | None:
    """Read the ``model`` of a JSON request body without changing the body.

    Args:
        body: The request body as received.

    Returns:
        The body's top-level ``model`` if the body is a JSON object whose
        ``model`` is a string, else None (for multipart uploads, for example).
    """
    if not body.lstrip()[:1] == b"{":
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict):
        model = document.get("model")
        if isinstance(model, str):
            return model
    return None
