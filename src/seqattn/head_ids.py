"""Ids for (sequence, KV head) pairs, so each head can be its own sequence in a descriptor."""

from __future__ import annotations

from ._checks import INT64_MAX, INT64_MIN, checked_index, exact_int
from .errors import InvalidArgumentError


class HeadIDGenerator:
    """Maps ``(seq_id, head_idx)`` to one integer id and back, without collisions.

    ``head_id = seq_id * num_kv_heads + head_idx``: a bijection between integers and
    pairs with ``0 <= head_idx < num_kv_heads``, for any head count. (For a power of
    two this equals the seed's ``seq_id << log2(num_kv_heads) | head_idx``.) Every id
    fits in int64: a ``seq_id`` whose head ids would not is refused, never wrapped.

    Example:
        >>> gen = HeadIDGenerator(num_kv_heads=12)
        >>> gen.get_head_id(seq_id=1, head_idx=5)
        17
        >>> gen.split_head_id(17)
        (1, 5)
    """

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = exact_int(num_kv_heads, "num_kv_heads", low=1, high=2**31 - 1)
        # the seq ids whose every head id lies in int64
        self._low = -(2**63 // self.num_kv_heads)
        self._high = (INT64_MAX - self.num_kv_heads + 1) // self.num_kv_heads

    def get_head_id(self, seq_id: int, head_idx: int) -> int:
        """The id of head ``head_idx`` of sequence ``seq_id``.

        Raises:
            ArgumentTypeError: not integers. IndexOutOfRangeError: ``head_idx`` outside
            ``[0, num_kv_heads)``. InvalidArgumentError: head ids of ``seq_id`` overflow int64.
        """
        return self.first_id(seq_id) + checked_index(head_idx, "head_idx", self.num_kv_heads)

    def get_head_ids(self, seq_id: int) -> list[int]:
        """Ids of all heads of ``seq_id``, in head order."""
        base = self.first_id(seq_id)
        return list(range(base, base + self.num_kv_heads))

    def split_head_id(self, head_id: int) -> tuple[int, int]:
        """The inverse: ``(seq_id, head_idx)`` of a head id (an int64 integer)."""
        seq_id, head_idx = divmod(exact_int(head_id, "head_id", low=INT64_MIN, high=INT64_MAX),
                                  self.num_kv_heads)  # fmt: skip
        return seq_id, head_idx

    def first_id(self, seq_id: object) -> int:
        """The id of head 0 of ``seq_id``, after checking that every head id of it fits
        in int64 (ArgumentTypeError, InvalidArgumentError)."""
        low, high = self._low, self._high
        what = f"seq_id (its {self.num_kv_heads} head ids must fit in int64)"
        return exact_int(seq_id, what, low=low, high=high, error=InvalidArgumentError) * (
            self.num_kv_heads
        )
