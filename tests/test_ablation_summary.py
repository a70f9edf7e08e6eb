"""The seeded ablation's summary (benchmarks/ablation_sample.py): gaps to the baseline and
the teacher-code rows' comparisons, with whether they exceed twice the larger seed spread."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_sample.py"
spec = importlib.util.spec_from_file_location("ablation_sample", SCRIPT)
ablation = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ablation  # dataclasses look their module up there
spec.loader.exec_module(ablation)


def rows(values: dict[str, list[float]]) -> list[dict]:
    """Per-seed rows; MSS is MISS + 1 so both metrics are checked at once."""
    return [{"variant": name, "seed": 3407 + i, "miss_mean_mIoU": v, "mss_mIoU": v + 1}
            for name, per_seed in values.items() for i, v in enumerate(per_seed)]


ROWS = {"CE only": [4.0, 5.0, 6.0], "full model": [10.0, 11.0, 12.0],
        "isolated": [5.0, 6.0, 7.0]}


def test_gaps_to_the_baseline_and_between_codealign_rows():
    data = rows({**ROWS, "isolated + codes": [9.0, 9.5, 10.0]})
    table = {t["variant"]: t for t in ablation.summarise(data, list({r["variant"]: 0
                                                                      for r in data}))}
    assert table["full model"]["miss_mean_mIoU"] == (11.0, 1.0)
    assert table["isolated + codes"]["miss_mean_mIoU"] == (9.5, 0.5)
    # to CE only: 11 - 5 = +6 beyond 2 x 1; 6 - 5 = +1 inside it
    assert table["full model"]["miss_mean_mIoU_gap"] == 6.0
    assert table["full model"]["miss_mean_mIoU_beyond_2std"] is True
    assert table["isolated"]["mss_mIoU_gap"] == 1.0
    assert table["isolated"]["mss_mIoU_beyond_2std"] is False
    assert "miss_mean_mIoU_gap" not in table["CE only"]
    coded = table["isolated + codes"]["vs"]
    assert set(coded) == {"full model", "isolated"}
    assert coded["isolated"]["miss_mean_mIoU"] == {"gap": 3.5, "beyond_2std": True}
    # noise is twice the LARGER spread (1.0 of full model), not the smaller (0.5)
    assert coded["full model"]["mss_mIoU"] == {"gap": -1.5, "beyond_2std": False}
    assert table["isolated"]["vs"] == {"full model": {
        "mss_mIoU": {"gap": -5.0, "beyond_2std": True},
        "miss_mean_mIoU": {"gap": -5.0, "beyond_2std": True}}}
    assert "vs" not in table["full model"]
    target = ablation.teacher_codes_target(list(table.values()))
    assert target["isolated_vs_full"] == -5.0 and target["isolated_codes_vs_full"] == -1.5
    assert target["closer"] and target["beyond_2std"] and target["met"] is True


@pytest.mark.parametrize("with_codes, closer, beyond", [
    ([6.5, 7.5, 8.5], True, False),   # closer, but +1.5 is inside 2 x 1
    ([2.0, 3.0, 4.0], False, True),   # apart beyond noise, but farther from the full model
    ([15.0, 16.0, 17.0], False, True),  # overshoots the full model by more than isolated misses it
])
def test_the_teacher_codes_target_needs_closer_and_beyond_the_spread(with_codes, closer, beyond):
    table = ablation.summarise(rows({**ROWS, "isolated + codes": with_codes}),
                               [*ROWS, "isolated + codes"])
    target = ablation.teacher_codes_target(table)
    assert (target["closer"], target["beyond_2std"], target["met"]) == (closer, beyond, False)


def test_one_seed_or_a_missing_row_decides_nothing():
    one = {name: values[:1] for name, values in {**ROWS, "isolated + codes": [9.0]}.items()}
    table = ablation.summarise(rows(one), list(one))
    assert math.isnan(table[0]["miss_mean_mIoU"][1])
    target = ablation.teacher_codes_target(table)
    assert target["closer"] is True and target["beyond_2std"] is None and target["met"] is None
    assert ablation.teacher_codes_target(ablation.summarise(rows(ROWS), list(ROWS))) is None
