import pytest

from offsite_ds.errors import LayoutError
from offsite_ds.sandwich import Layout, adapter_indices, emulator_block_map, select_kept


def test_selection_matches_the_original_rule():
    middle = list(range(2, 22))  # OPT-1.3B: 24 blocks, 2-8-2
    kept = select_kept(middle, 8)
    stride = (len(middle) - 1) / 7
    assert kept == [middle[round(i * stride)] for i in range(8)]
    assert kept[0] == 2 and kept[-1] == 21  # first and last middle block always kept
    assert len(set(kept)) == 8


@pytest.mark.parametrize("n,k", [(20, 1), (20, 2), (20, 20), (28, 18), (16, 12), (3, 2), (5, 4)])
def test_selection_is_sorted_unique_and_keeps_ends(n, k):
    middle = list(range(10, 10 + n))
    kept = select_kept(middle, k)
    assert kept == sorted(set(kept)) and len(kept) == k
    assert kept[0] == middle[0]
    if k > 1:
        assert kept[-1] == middle[-1]


def test_paper_layouts():
    assert Layout.parse("2-18-2", 32) == Layout(2, 18, 2)  # OPT-6.7B
    assert Layout.parse("2-12-2", 30) == Layout(2, 12, 2)  # BLOOM-7.1B
    block_map = emulator_block_map(30, Layout(2, 12, 2))
    assert block_map[:2] == [0, 1] and block_map[-2:] == [28, 29] and len(block_map) == 16
    assert Layout(2, 12, 2).adapter_positions == [0, 1, 14, 15]
    assert adapter_indices(30, Layout(2, 12, 2)) == [0, 1, 28, 29]


def test_keep_ratio():
    assert Layout.parse("2-*-2", 24, keep_ratio=0.4) == Layout(2, 8, 2)
    assert Layout.parse("1-*-1", 6, keep_ratio=0.01).kept == 1


@pytest.mark.parametrize("spec,n,ratio,needle", [
    ("2-8", 24, None, "not of the form"),
    ("12-1-12", 24, None, "leave no middle"),
    ("2-0-2", 24, None, "between 1 and"),
    ("2-21-2", 24, None, "between 1 and"),
    ("2-*-2", 24, None, "--keep-ratio"),
    ("2-8-2", 24, 0.5, "not both"),
    ("2-*-2", 24, 1.5, "must be in"),
    (None, 24, None, "no layout"),
])
def test_bad_layouts_say_what_to_do(spec, n, ratio, needle):
    with pytest.raises(LayoutError, match=needle):
        Layout.parse(spec, n, keep_ratio=ratio)
