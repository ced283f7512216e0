"""Evaluation prompts from a local Pick-a-Pic-schema directory: read split by split, so an empty split is a clear
one-line error when asked for and no obstacle when another split is."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from test_data_pickapic import make_row

from diffalign.data import write_pickapic_dataset
from diffalign.eval.prompts import load_prompt_set, read_pickapic_prompts
from diffalign.eval.protocol import split_prompts


@pytest.fixture
def data_with_empty_validation(tmp_path):
    rows = [make_row(i, caption=f"prompt {i % 3}") for i in range(5)]
    write_pickapic_dataset({"train": rows[:2], "test": rows, "validation": []}, tmp_path / "ds")
    return tmp_path / "ds"


def test_split_prompts_reads_a_split_next_to_an_empty_one(data_with_empty_validation):
    data = str(data_with_empty_validation)
    assert split_prompts(data, "test") == ["prompt 0", "prompt 1", "prompt 2"]
    assert split_prompts(data, "test", 2) == ["prompt 0", "prompt 1"]
    assert read_pickapic_prompts(data, "test").prompts == ["prompt 0", "prompt 1", "prompt 2"]
    # an empty file as older writers made it (one row group of 0 rows: datasets' own reader chokes on it)
    empty = data_with_empty_validation / "data" / "validation-00000-of-00001.parquet"
    pq.write_table(pq.read_table(empty), empty)
    assert pq.ParquetFile(empty).metadata.num_row_groups == 1
    assert split_prompts(data, "test") == ["prompt 0", "prompt 1", "prompt 2"]


def test_an_empty_evaluation_split_is_a_one_line_error(data_with_empty_validation):
    data = str(data_with_empty_validation)
    expected = rf"dataset '{data}' split 'validation' has no rows, so it has no prompts: choose another split"
    with pytest.raises(ValueError, match=expected) as err:
        split_prompts(data, "validation")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=expected):
        load_prompt_set(data, "validation")
    with pytest.raises(
        ValueError, match=r"split 'test_unique' not found \(splits found: train, validation, test\)"
    ):
        split_prompts(data, "test_unique")
