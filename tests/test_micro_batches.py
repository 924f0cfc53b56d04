import random

import pytest

from dialogrl.training.micro_batches import within_budget


def test_groups_cover_every_row_once_and_stay_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)]
    groups = within_budget(lengths, 1000)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 1000
    # Longest first: a group pads only to its own first row.
    firsts = [lengths[group[0]] for group in groups]
    assert firsts == sorted(firsts, reverse=True)
    assert len(groups) < len(lengths) / 2  # rows do share passes


def test_a_row_longer_than_the_budget_goes_alone_and_a_bad_budget_is_refused():
    assert within_budget([50, 2000, 40, 30], 100) == [[1], [0, 2], [3]]  # 2 x 50 fits, 3 x 50 does not
    assert within_budget([], 100) == []
    with pytest.raises(ValueError, match="budget must be >= 1"):
        within_budget([3], 0)
