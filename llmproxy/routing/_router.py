"""The router: (path, model) -> route, and reading a request body's model."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from llmproxy.config import Config, RouteConfig
from llmproxy.routing._pool import UpstreamPool, Clock, ZeroClock


@attrs.frozen
class Route:
    """Where one request goes.

    Attributes:
        pool: The upstream pool that serves it.
        path_key: The ``target_map`` key that matched the path.
        model: The model whose route was used (the real model when the
            request named an alias), or None when the path's base URL was
            used.
        rewrite_model: The real model when the request named an alias of it
            (the body sent upstream must name this model), else None.
        fallbacks: Models to try, in order, when every upstream of
            ``model`` failed.
    """

    pool: UpstreamPool
    path_key: str
    model: str | None
    rewrite_model: str | None = None
    fallbacks: tuple[str, ...] = ()


class Router:
    """Chooses the upstream pool for a request path and model.

    A path that is a key of ``target_map`` routes there; otherwise the
    longest key ending in ``/`` that prefixes the path. When the request names
    a model that ``model_routes`` knows, that model's pool serves it instead;
    an alias from ``model_aliases`` is served by its model's pool.
    """

    def __init__(
        self,
        target_map: Mapping[str, RouteConfig],
        model_routes: Mapping[str, RouteConfig],
        clock: Clock | None = None,
        model_aliases: Mapping[str, str] | None = None,
        fallbacks: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """Build the lookup tables and one pool per route.

        Args:
            target_map: Path (or path prefix ending in ``/``) to route.
            model_routes: Model name to route.
            clock: Where the pools read time (``seconds()``), such as the
                reactor; None for a clock stuck at 0.0.
            model_aliases: Alias to the model (a key of ``model_routes``)
                that serves it; aliases of unknown models are ignored.
            fallbacks: Model to the models tried after it, in order.
        """
        clock = ZeroClock() if clock is None else clock
        self._exact: dict[bytes, tuple[str, Route]] = {}
        self._path_pools: list[UpstreamPool] = []
        prefixes = []
        for key, route in target_map.items():
            pool = UpstreamPool.from_route(key, route, clock)
            self._path_pools.append(pool)
            entry = (key, Route(pool=pool, path_key=key, model=None))
            raw = key.encode("utf-8")
            self._exact[raw] = entry
            if key.endswith("/"):
                prefixes.append((raw, entry))
        prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._prefixes = prefixes
        self._models = {
            name: UpstreamPool.from_route(name, route, clock)
            for name, route in model_routes.items()
        }
        self._aliases = {
            alias: model
            for alias, model in (model_aliases or {}).items()
            if model in self._models and alias not in self._models
        }
        self._fallbacks = {
            model: tuple(chain) for model, chain in (fallbacks or {}).items()
        }
        #: Whether any route depends on the body's ``model`` (else the proxy
        #: never looks for it).
        self.uses_model = bool(self._models)

    @classmethod
    def from_config(cls, config: Config, clock: Clock | None = None) -> Router:
        """Build a router from a validated config.

        Args:
            config: The configuration.
            clock: Where the pools read time, such as the reactor; None for
                a clock stuck at 0.0.

        Returns:
            A router for its ``target_map``, ``model_routes``,
            ``model_aliases`` and ``fallbacks``.
        """
        return cls(
            config.target_map,
            config.model_routes,
            clock=clock,
            model_aliases=config.model_aliases,
            fallbacks=config.fallbacks,
        )

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
        path_key, path_route = entry
        if model is not None:
            model_pool = self._models.get(model)
            if model_pool is not None:
                return Route(
                    pool=model_pool,
                    path_key=path_key,
                    model=model,
                    fallbacks=self._fallbacks.get(model, ()),
                )
            real = self._aliases.get(model)
            if real is not None:
                return Route(
                    pool=self._models[real],
                    path_key=path_key,
                    model=real,
                    rewrite_model=real,
                    fallbacks=self._fallbacks.get(real, ()),
                )
        return path_route

    def pool_for_model(self, model: str) -> UpstreamPool | None:
        """Return the pool serving a model or alias (for fallbacks).

        Args:
            model: A model or alias name.

        Returns:
            Its pool, or None when neither ``model_routes`` nor
            ``model_aliases`` knows it.
        """
        pool = self._models.get(model)
        if pool is None:
            real = self._aliases.get(model)
            if real is not None:
                pool = self._models[real]
        return pool

    def pools(self) -> list[UpstreamPool]:
        """List every pool: the paths' in file order, then the models'.

        Returns:
            The pools, each once.
        """
        return [*self._path_pools, *self._models.values()]
