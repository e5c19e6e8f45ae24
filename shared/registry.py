"""One registry per kind of plug-in, looked up by name.

Modalities, maskers, objectives, encoders, decoders and model sizes register themselves on
import; `polymae info` lists what is registered. An unknown name is a
`KeyError` that names the registry and the names it knows.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None):
        """`REG.register("x", obj)` or `@REG.register("x")` on a class or function."""
        def add(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add(entry) if entry is not None else add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


MODALITIES: Registry = Registry("modality")
MASKERS: Registry[Callable] = Registry("masker")
OBJECTIVES: Registry[Callable] = Registry("objective")
MODEL_SIZES: Registry[dict] = Registry("model size")
ENCODERS: Registry[Callable] = Registry("encoder")
DECODERS: Registry[Callable] = Registry("decoder")
