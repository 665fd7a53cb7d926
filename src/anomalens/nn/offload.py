"""Keeping idle weights out of memory: some of a module's tensors parked in a temporary file between uses.

CLIPFusion holds two text encoders, open_clip's text tower (~0.5 GB at ViT-L/14) and Stable Diffusion's
(~1.3 GB at SD 2.1), that run once per class name: their outputs are cached, and every image after that needs
only the cache. :class:`ParkedTensors` writes such tensors once to a temporary safetensors file and swaps
them for storage-less ``meta`` tensors, so they stop counting against the process's memory; reading them
back takes about a second per new class name.

The parked tensors come back, bit for bit, inside :meth:`ParkedTensors.resident` (which parks them again on
exit) or by :meth:`ParkedTensors.restore`. A detector that parks tensors inherits :class:`OffloadMixin`, which
brings every parked set of its modules back for ``state_dict``, ``load_state_dict``, ``.to()`` and pickling, so
saving, loading, converting and copying the detector see the real weights. The file is deleted when its
:class:`ParkedTensors` is garbage-collected or the interpreter exits. It goes to Python's temporary folder (``TMPDIR``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


class ParkedTensors:
    """A named subset of a module's parameters and buffers (non-persistent buffers too) that can be parked.

    Args:
        root: The module that owns the tensors.
        label: Names the set in log messages.
        include: Name prefixes of the set's tensors in ``root`` (``""``: all of them).
        exclude: Name prefixes left out of it (e.g. ``("visual.",)``).
        device_module: The tensors come back on this module's device (after any ``.to()``); default ``root``.

    Raises:
        ValueError: The prefixes select no tensor of ``root``.
    """

    def __init__(
        self,
        root: nn.Module,
        label: str,
        *,
        include: tuple[str, ...] = ("",),
        exclude: tuple[str, ...] = (),
        device_module: nn.Module | None = None,
    ):
        self.root = root
        self.label = label
        self.include = include
        self.exclude = exclude
        self.device_module = root if device_module is None else device_module
        self.parked = False
        self._path: str | None = None
        self._finalizer: weakref.finalize | None = None
        if not self._tensors():
            raise ValueError(
                f"include={include} and exclude={exclude} select no tensor of {type(root).__name__} for {label!r}"
            )

    def _selects(self, name: str) -> bool:
        return name.startswith(self.include) and not name.startswith(self.exclude)

    def _device(self) -> torch.device:
        for tensor in (*self.device_module.parameters(), *self.device_module.buffers()):
            if not tensor.is_meta:
                return tensor.device
        return torch.device("cpu")

    def _tensors(self) -> dict[str, tuple[nn.Module, str, bool, torch.Tensor]]:
        """Selected name -> ``(owning module, attribute, is_parameter, tensor)``, shared tensors under every name."""
        entries = {}
        for module_name, module in self.root.named_modules(remove_duplicate=False):
            for registry, is_parameter in ((module._parameters, True), (module._buffers, False)):
                for attribute, tensor in registry.items():
                    name = f"{module_name}.{attribute}" if module_name else attribute
                    if tensor is not None and self._selects(name):
                        entries[name] = (module, attribute, is_parameter, tensor)
        return entries

    def park(self) -> None:
        """Write the tensors to the temporary file (the first time only) and drop them from memory."""
        if self.parked:
            return
        from safetensors.torch import save_file

        entries = self._tensors()
        if self._path is None:
            first_name_of: dict[int, str] = {}
            payload = {}
            for name, (_, _, _, tensor) in entries.items():
                if id(tensor) not in first_name_of:
                    first_name_of[id(tensor)] = name
                    payload[name] = tensor.detach().cpu().contiguous()
            try:
                handle, path = tempfile.mkstemp(prefix="anomalens-parked-", suffix=".safetensors")
                os.close(handle)
                finalizer = weakref.finalize(self, _remove_file, path)
                try:
                    save_file(payload, path)
                except BaseException:
                    finalizer()
                    raise
            except OSError as error:  # a full or read-only temporary folder: keep the weights, lose nothing
                logger.warning("could not park %s in %s (%s); it stays in memory", self.label, tempfile.gettempdir(),
                               error)  # fmt: skip
                return
            self._path, self._finalizer = path, finalizer
            self._aliases = {name: first_name_of[id(tensor)] for name, (_, _, _, tensor) in entries.items()}
            size = sum(tensor.numel() * tensor.element_size() for tensor in payload.values())
            logger.info("parked %s (%.0f MB) in %s", self.label, size / 1e6, path)
        with torch.inference_mode(False):
            self._replace(entries, lambda _, tensor: torch.empty_like(tensor, device="meta"))
        self.parked = True

    def _replace(
        self,
        entries: dict[str, tuple[nn.Module, str, bool, torch.Tensor]],
        new_tensor: Callable[[str, torch.Tensor], torch.Tensor],
    ) -> None:
        """Swap each entry's tensor for ``new_tensor(canonical name, old tensor)``, made once per shared tensor (the
        names that aliased one tensor alias the new one) and a frozen parameter where the old one was a parameter."""
        replaced: dict[str, torch.Tensor] = {}
        for name, (module, attribute, is_parameter, tensor) in entries.items():
            canonical = self._aliases[name]
            if canonical not in replaced:
                new = new_tensor(canonical, tensor)
                replaced[canonical] = nn.Parameter(new, requires_grad=False) if is_parameter else new
            (module._parameters if is_parameter else module._buffers)[attribute] = replaced[canonical]

    def restore(self) -> None:
        """Read the parked tensors back from the file onto ``device_module``'s device, bit for bit; the file is kept."""
        if not self.parked:
            return
        from safetensors.torch import load_file

        with torch.inference_mode(False):  # ordinary tensors, which load_state_dict may later copy into
            loaded = load_file(self._path, device=str(self._device()))
            self._replace(self._tensors(), lambda canonical, _: loaded[canonical])
        self.parked = False

    @contextmanager
    def resident(self) -> Iterator[None]:
        """The tensors in memory for the ``with`` block; parked again afterwards if they were parked before."""
        was_parked = self.parked
        self.restore()
        try:
            yield
        finally:
            if was_parked:
                self.park()

    def forget_file(self) -> None:
        """Delete the file of a restored set (its tensors are about to change); the next :meth:`park` writes anew."""
        if self.parked:
            raise RuntimeError(f"{self.label} is parked: restore() it before its file is forgotten")
        if self._finalizer is not None:
            self._finalizer()
        self._path = self._finalizer = None

    def __getstate__(self) -> dict:
        if self.parked:
            raise RuntimeError(f"{self.label} is parked in a temporary file: restore() it before copying or pickling")
        return {**self.__dict__, "_path": None, "_finalizer": None}  # a copy writes its own file


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def parked_sets(root: nn.Module) -> list[ParkedTensors]:
    """Every :class:`ParkedTensors` held as an attribute by ``root`` or one of its sub-modules."""
    found = []
    for module in root.modules():
        found.extend(value for value in vars(module).values() if isinstance(value, ParkedTensors))
    return found


class OffloadMixin:
    """Mixin for an ``nn.Module`` (a detector) whose sub-modules hold :class:`ParkedTensors` sets.

    Put it before the module class in the bases (``class CLIPFusion(OffloadMixin, Detector)``): it overrides
    ``state_dict``, ``load_state_dict``, ``_apply`` (behind ``.to()``, ``.cuda()``, ``.half()``) and pickling so that
    each of them works on the real weights, never on parked ``meta`` tensors.
    """

    @contextmanager
    def resident(self) -> Iterator[None]:
        """Every parked tensor set of the module in memory for the block."""
        with ExitStack() as stack:
            for parked in parked_sets(self):
                stack.enter_context(parked.resident())
            yield

    def state_dict(self, *args, **kwargs):
        """``state_dict`` with parked tensors read back, so it always holds the real weights."""
        with self.resident():
            return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``load_state_dict`` after parked tensors are restored and their stale files dropped."""
        self.restore_parked()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _apply(self, fn, recurse: bool = True):
        """The conversion on the real weights: parked tensors come back first and their files are dropped (the
        conversion may change them); the next prompts park them again, from their new device and dtype."""
        self.restore_parked()
        return super()._apply(fn, recurse)

    def restore_parked(self) -> None:
        """Read every parked tensor set back and delete its file: the tensors are about to change."""
        for parked in parked_sets(self):
            parked.restore()
            parked.forget_file()

    def __getstate__(self) -> dict:
        for parked in parked_sets(self):  # a pickled or copied detector carries its real weights
            parked.restore()
        return super().__getstate__()
