import pytest

from seqattn import ArgumentTypeError, HeadIDGenerator, IndexOutOfRangeError, InvalidArgumentError


@pytest.mark.parametrize("num_heads", [1, 2, 3, 8, 12, 32, 40])
def test_head_ids_never_collide_and_invert(num_heads):
    gen = HeadIDGenerator(num_heads)
    seen = {}
    for seq in range(-3, 50):
        for head in range(num_heads):
            head_id = gen.get_head_id(seq, head)
            assert head_id not in seen, f"{(seq, head)} collides with {seen[head_id]}"
            seen[head_id] = (seq, head)
            assert gen.split_head_id(head_id) == (seq, head)


def test_twelve_heads_do_not_collide_as_in_0_0_2():
    gen = HeadIDGenerator(12)  # 0.0.2 shifted by 3 bits: (0, 8) == (1, 0)
    assert gen.get_head_id(0, 8) != gen.get_head_id(1, 0)


def test_bad_head_index_or_count():
    gen = HeadIDGenerator(4)
    with pytest.raises(IndexOutOfRangeError, match=r"head_idx must be an integer in \[0, 3\]"):
        gen.get_head_id(1, 4)
    with pytest.raises(IndexError):
        gen.get_head_id(1, -1)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(ArgumentTypeError):
            gen.get_head_id(1, bad)
        with pytest.raises(ArgumentTypeError):
            gen.get_head_id(bad, 0)
        with pytest.raises(ArgumentTypeError):
            gen.get_head_ids(bad)
        with pytest.raises(ArgumentTypeError):
            gen.split_head_id(bad)
        with pytest.raises(TypeError):
            HeadIDGenerator(bad)
    with pytest.raises(ValueError):
        HeadIDGenerator(0)


def test_head_ids_fit_in_int64_or_are_refused():
    gen = HeadIDGenerator(12)
    top = (2**63 - 12) // 12  # the largest seq id whose 12 head ids fit
    assert gen.get_head_ids(top)[-1] <= 2**63 - 1
    assert gen.get_head_id(-(2**63 // 12), 0) >= -(2**63)
    for seq in (top + 1, -(2**63 // 12) - 1, 2**63):
        with pytest.raises(InvalidArgumentError, match="fit in int64"):
            gen.get_head_id(seq, 0)
    with pytest.raises(InvalidArgumentError):
        gen.split_head_id(2**63)
