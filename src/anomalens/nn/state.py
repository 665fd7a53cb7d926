"""Module state that follows the module: caches of derived tensors, and fitted buffers whose shape depends on data.

- :class:`EmbeddingCache`: prompt / caption embeddings computed once and kept as non-persistent buffers, so
  ``.to(device)``, ``.to(dtype)``, copies and pickles carry them along with the weights they came from, and they
  are never written into a saved detector. :meth:`Detector.load_state_dict` clears every cache, because new weights
  make the cached embeddings stale.
- :class:`ResizableBuffers`: a mixin for modules whose fitted buffers (a memory bank of N x D features) take the
  shape of the data they were fitted on; loading a state dict gives them the saved shape first.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, MutableMapping
from typing import ClassVar

import torch
from torch import nn


class EmbeddingCache(nn.Module):
    """A dictionary ``key -> tuple of tensors`` stored as non-persistent buffers.

    Keys are any hashable value (a prompt string, a ``(class name, prompt set)`` tuple). Each value is a tuple of
    tensors; a conversion with ``.to()`` applies to them like to any buffer (floating tensors change dtype, integer
    masks keep theirs).
    """

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[Hashable, tuple[str, ...]] = {}
        self._counter = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._names

    def __len__(self) -> int:
        return len(self._names)

    def get(self, key: Hashable) -> tuple[torch.Tensor, ...]:
        """The tensors stored under ``key`` (``KeyError`` when absent)."""
        return tuple(getattr(self, name) for name in self._names[key])

    def put(self, key: Hashable, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store ``tensors`` under ``key`` (replacing an earlier entry); returns them."""
        self.discard(key)
        names = []
        for tensor in tensors:
            name = f"entry{self._counter}"
            self._counter += 1
            self.register_buffer(name, tensor.detach(), persistent=False)
            names.append(name)
        self._names[key] = tuple(names)
        return self.get(key)

    def discard(self, key: Hashable) -> None:
        """Drop ``key`` if present."""
        for name in self._names.pop(key, ()):
            delattr(self, name)

    def clear(self) -> None:
        """Drop every entry (the weights they were computed with changed)."""
        for key in list(self._names):
            self.discard(key)

    def extra_repr(self) -> str:
        return f"entries={len(self._names)}"


def clear_embedding_caches(root: nn.Module) -> None:
    """Clear every :class:`EmbeddingCache` below ``root``."""
    for module in root.modules():
        if isinstance(module, EmbeddingCache):
            module.clear()


class ResizableBuffers:
    """Mixin for an ``nn.Module`` whose buffers named in ``resizable_buffers`` take the shape of the fitted data.

    Loading a state dict (``load_state_dict`` or :func:`anomalens.backbones.weights.load_state_dict_checked`)
    first replaces each such buffer by an empty tensor of the saved shape (keeping its dtype and device), so a
    fitted memory bank of any size loads into a freshly built module.
    """

    resizable_buffers: ClassVar[tuple[str, ...]] = ()  # buffer names whose shape follows the fitted data
    # buffers files saved before them lack, with the value such a file means (filled in when loading it)
    added_buffers: ClassVar[dict[str, Callable[[], torch.Tensor]]] = {}

    def complete_state(self, state: MutableMapping[str, torch.Tensor], prefix: str = "") -> None:
        """Put the meaning of each of :attr:`added_buffers` into ``state`` where an older file lacks it (only
        when the module's other buffers are there: a missing module stays missing, for the key check)."""
        present = any(key.startswith(prefix) and key[len(prefix):] in self.resizable_buffers for key in state)
        for name, default in self.added_buffers.items():
            if present and prefix + name not in state:
                state[prefix + name] = default()

    def resize_buffers_for(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Give each resizable buffer the shape of ``state[prefix + name]`` where the state holds it."""
        for name in self.resizable_buffers:
            key = prefix + name
            if key in state:
                current = getattr(self, name)
                setattr(self, name, torch.empty(state[key].shape, dtype=current.dtype, device=current.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # nn.Module's per-module loading hook
        self.complete_state(state_dict, prefix)
        self.resize_buffers_for(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
