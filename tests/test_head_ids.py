import pytest

from seqattn import HeadIDGenerator, InvalidLengthError


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
    with pytest.raises(InvalidLengthError, match=r"\[0, 4\)"):
        HeadIDGenerator(4).get_head_id(1, 4)
    with pytest.raises(InvalidLengthError):
        HeadIDGenerator(0)
