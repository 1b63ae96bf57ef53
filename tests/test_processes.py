"""How `artmaster.processes` splits a stage's samples between the processes of `accelerate launch`
(the 2-process runs themselves are in test_augment.py and test_evaluate.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from artmaster.config import compose
from artmaster.processes import Processes


def _process(index: int, count: int) -> Processes:
    process = Processes.__new__(Processes)  # PartialState is one per interpreter: fake the others
    process.state = SimpleNamespace(num_processes=count, process_index=index, is_main_process=index == 0)
    return process


@pytest.mark.parametrize(("items", "count", "lengths"), [(7, 3, [3, 2, 2]), (2, 3, [1, 1, 0]), (4, 1, [4]), (0, 2, [0, 0])])
def test_shares_are_contiguous_balanced_and_cover_every_item_once(items, count, lengths):
    shares = [_process(index, count).share(list(range(items)), "test") for index in range(count)]
    assert [len(share) for share in shares] == lengths
    assert [item for share in shares for item in share] == list(range(items))  # gather's order


def test_a_plain_run_is_one_main_process_that_keeps_everything():
    process = Processes(compose([]).model)
    assert (process.count, process.index, process.is_main) == (1, 0, True)
    assert process.share(["a", "b", "c"], "test") == ["a", "b", "c"]
    assert process.gather(["a", "b", "c"]) == ["a", "b", "c"]
