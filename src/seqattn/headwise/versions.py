"""Which batches of each layer are current, and which layers wait for a step's K/V.

Every change to a layer's pages (an append, a compression, a release) moves the layer
to a new version; a batch or plan made at an older version is stale. A step takes its
tokens' pages before the forward pass computes their K/V, so until ``write`` each of its
layers holds tokens without K/V, which nothing may read or change.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence

from ..errors import SeqAttnError


class LayerVersions:
    """Per layer: the version of its pages, and the open step's sequences if unwritten.

    Args:
        num_layers: layers of the model.

    Example:
        >>> versions = LayerVersions(2)
        >>> v = versions.next             # batches of a step of both layers are packed at v
        >>> versions.changed([0, 1])       # the step takes its pages
        >>> versions.opened([0, 1], [7])  # sequence 7's new tokens wait for their K/V
        >>> versions.written(0); versions.check_written(0)
        >>> versions.unwritten_layers, versions[0] == v, versions[1] == v
        ([1], True, True)
    """

    def __init__(self, num_layers: int) -> None:
        self._versions = [0] * num_layers
        self._clock = 0
        # the layers whose step tokens are allocated but not written yet (their pages
        # hold stale data until then), each with the step's sequences that took tokens
        self._unwritten: dict[int, frozenset[int]] = {}

    def __getitem__(self, layer: int) -> int:
        """The current version of ``layer``."""
        return self._versions[layer]

    @property
    def next(self) -> int:
        """The version the next change will have (batches packed for it carry it)."""
        return self._clock + 1

    @property
    def unwritten_layers(self) -> list[int]:
        """Layers holding step tokens whose K/V are not written yet, ascending."""
        return sorted(self._unwritten)

    def changed(self, layers: Iterable[int]) -> None:
        """Move ``layers`` to version :attr:`next`, which makes their older batches stale."""
        self._clock += 1
        for layer in layers:
            self._versions[layer] = self._clock

    def restore(self, layer: int, version: int) -> None:
        """Undo a change of ``layer`` alone: back to ``version``, no step tokens waiting."""
        self._versions[layer] = version
        self._unwritten.pop(layer, None)

    def opened(self, layers: Sequence[int], seq_ids: Collection[int]) -> None:
        """Note that ``layers`` hold new tokens of ``seq_ids`` (if any) without K/V."""
        if seq_ids:
            self._unwritten.update(dict.fromkeys(layers, frozenset(seq_ids)))

    def written(self, layer: int) -> None:
        """Note that ``layer``'s step tokens have their K/V."""
        self._unwritten.pop(layer, None)

    def check_written(self, layer: int) -> None:
        """Raise SeqAttnError if ``layer`` holds tokens of a step not written yet."""
        if layer in self._unwritten:
            raise SeqAttnError(
                f"layer {layer} holds the open step's tokens, whose K/V are not written "
                f"yet: call write(step, {layer}, k, v) first"
            )

    def check_all_written(self) -> None:
        """Raise SeqAttnError if any layer holds tokens of a step not written yet."""
        if self._unwritten:
            raise SeqAttnError(
                f"layers {self.unwritten_layers} of the last step are not written yet: "
                "write them before beginning another step"
            )

    def check_release(self, seq_ids: list[int]) -> None:
        """Raise SeqAttnError unless releasing ``seq_ids`` ends every sequence that took
        tokens in unwritten layers."""
        pending = frozenset().union(*self._unwritten.values())
        if pending and not pending <= set(seq_ids):
            raise SeqAttnError(
                f"layers {self.unwritten_layers} of the open step are not written: "
                f"write them, or release all of that step's sequences "
                f"{sorted(pending)[:8]} together"
            )

    def released(self) -> None:
        """Note a release: every layer changed, and no layer waits for K/V any more."""
        self._unwritten.clear()
        self.changed(range(len(self._versions)))
