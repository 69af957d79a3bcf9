"""Prompt sources for text-to-image sampling: text, JSONL, CSV, datasets; cycling; bad input."""
from __future__ import annotations

import json

import pytest

from deme_cli.engine.errors import UsageError
from deme_cli.engine.prompts import load_prompts, prompt_for
from deme_cli.engine.recipe import SampleSection


def _sample(path, **kw):
    return SampleSection(prompts=str(path), **kw)


def test_text_file_one_prompt_per_line_blank_lines_skipped(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  the dog  \n")
    assert load_prompts(_sample(f)) == ["a cat", "the dog"]


def test_jsonl_and_csv_columns(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"id": i, "caption": c}) for i, c in enumerate(["x", "y"])) + "\n")
    assert load_prompts(_sample(j, prompt_column="caption")) == ["x", "y"]
    c = tmp_path / "p.csv"
    c.write_text('file_name,text\n0.jpg,"a cat, sitting"\n1.jpg,a dog\n')
    assert load_prompts(_sample(c, prompt_column="text")) == ["a cat, sitting", "a dog"]
    with pytest.raises(UsageError, match=r"no column 'prompt' \(columns: file_name, text\)"):
        load_prompts(_sample(c))
    with pytest.raises(UsageError, match="no key 'prompt'"):
        load_prompts(_sample(j))


def test_dataset_column_and_split(tmp_path):
    import datasets

    d = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"Prompt": ["p0", "p1"]}),
                          "test": datasets.Dataset.from_dict({"Prompt": ["q0"]})}).save_to_disk(str(d))
    assert load_prompts(_sample(d, prompt_column="Prompt")) == ["p0", "p1"]
    assert load_prompts(_sample(d, prompt_column="Prompt", prompt_split="test")) == ["q0"]
    with pytest.raises(UsageError, match="no split 'val'"):
        load_prompts(_sample(d, prompt_column="Prompt", prompt_split="val"))


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompt_file_is_a_usage_error(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(UsageError, match="holds no prompts"):
        load_prompts(_sample(f))


def test_missing_file_and_no_prompts_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_prompts(_sample(tmp_path / "nope.txt"))
    with pytest.raises(UsageError, match="set sample.prompts"):
        load_prompts(SampleSection())


def test_prompts_cycle_over_images():
    ps = ["a", "b", "c"]
    assert [prompt_for(ps, k) for k in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
