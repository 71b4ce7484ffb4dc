"""Ids for (sequence, KV head) pairs, so each head can be its own sequence in a descriptor."""

from __future__ import annotations

from .errors import InvalidLengthError


class HeadIDGenerator:
    """Maps ``(seq_id, head_idx)`` to one integer id and back, without collisions.

    ``head_id = seq_id * num_kv_heads + head_idx``: a bijection between integers and
    pairs with ``0 <= head_idx < num_kv_heads``, for any head count. (For a power of
    two this equals the seed's ``seq_id << log2(num_kv_heads) | head_idx``.)

    Example:
        >>> gen = HeadIDGenerator(num_kv_heads=12)
        >>> gen.get_head_id(seq_id=1, head_idx=5)
        17
        >>> gen.split_head_id(17)
        (1, 5)
    """

    def __init__(self, num_kv_heads: int) -> None:
        if int(num_kv_heads) <= 0:
            raise InvalidLengthError(f"num_kv_heads must be positive, got {num_kv_heads}")
        self.num_kv_heads = int(num_kv_heads)

    def get_head_id(self, seq_id: int, head_idx: int) -> int:
        """The id of head ``head_idx`` of sequence ``seq_id``."""
        if not 0 <= head_idx < self.num_kv_heads:
            raise InvalidLengthError(
                f"head_idx must be in [0, {self.num_kv_heads}), got {head_idx}"
            )
        return int(seq_id) * self.num_kv_heads + int(head_idx)

    def get_head_ids(self, seq_id: int) -> list[int]:
        """Ids of all heads of ``seq_id``, in head order."""
        base = int(seq_id) * self.num_kv_heads
        return list(range(base, base + self.num_kv_heads))

    def split_head_id(self, head_id: int) -> tuple[int, int]:
        """The inverse: ``(seq_id, head_idx)`` of a head id."""
        seq_id, head_idx = divmod(int(head_id), self.num_kv_heads)
        return seq_id, head_idx
