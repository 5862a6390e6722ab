"""Registries of named parts (rewards, distances, prompt sets, evaluation metrics, FID features) and the plugins
that add to them.

A plugin is a module named by an entry point of the group ``rglcd.plugins``; importing it registers its parts
with the registries' ``register`` decorators. In a package's pyproject.toml::

    [project.entry-points."rglcd.plugins"]
    my_rewards = "my_package.rglcd_plugin"

Plugins are imported the first time any registry is read, so every registry lists the built-ins and every
installed plugin's parts. The miniature world (:mod:`rglcd.world.plugin`) is one: only the CLI and the experiments,
the top layers, import :mod:`rglcd.world`; the rest of rglcd reaches it through the registries.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

PLUGIN_GROUP = "rglcd.plugins"
T = TypeVar("T")
_plugins_loaded = False


def load_plugins() -> None:
    """Import every installed plugin, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # first: a plugin that reads a registry while it registers does not load itself again
    for entry_point in entry_points(group=PLUGIN_GROUP):
        entry_point.load()


class Registry(Generic[T]):
    """Named entries of one kind: ``@registry.register("name")`` on a class, factory or function."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorate

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        load_plugins()
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        """The entry, or a ValueError naming the registered ones."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]
