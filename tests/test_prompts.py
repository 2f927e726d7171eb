from __future__ import annotations

import json

import pytest

from imagebatch.errors import PromptFileError
from imagebatch.models import MAX_PROMPT_CHARS
from imagebatch.prompts import load_prompts

GOOD_JSONL = "\n".join(
    [
        json.dumps({"id": "a", "prompt": "a red mug", "aspect_ratio": "16:9", "seed": 3}),
        "",
        json.dumps({"prompt": "a blue mug", "metadata": {"sku": "B-1"}}),
    ]
)


def test_jsonl_loads_prompts_with_parameters_and_skips_blank_lines(write_file):
    loaded = load_prompts(write_file("p.jsonl", GOOD_JSONL))
    assert [p.prompt for p in loaded.prompts] == ["a red mug", "a blue mug"]
    first, second = loaded.prompts
    assert (first.id, first.aspect_ratio, first.seed, first.size) == ("a", "16:9", 3, "1K")
    assert second.metadata == {"sku": "B-1"}
    assert loaded.rejected == []


def test_missing_id_is_a_stable_hash_of_the_content(write_file):
    one = load_prompts(write_file("one.jsonl", '{"prompt": "a cat", "seed": 1}'))
    two = load_prompts(write_file("two.jsonl", '{"seed": 1, "prompt": "a cat"}'))
    other = load_prompts(write_file("three.jsonl", '{"prompt": "a cat", "seed": 2}'))
    assert one.prompts[0].id == two.prompts[0].id
    assert one.prompts[0].id.startswith("p-")
    assert other.prompts[0].id != one.prompts[0].id


def test_csv_with_metadata_columns_and_typed_cells(write_file):
    path = write_file(
        "p.csv",
        'id,prompt,aspect_ratio,seed,metadata.sku\nx1,"a mug, on a table",4:3,42,SKU-9\n'
        "x2,a plate,,,\n",
    )
    loaded = load_prompts(path)
    x1, x2 = loaded.prompts
    assert (x1.prompt, x1.aspect_ratio, x1.seed, x1.metadata) == (
        "a mug, on a table",
        "4:3",
        42,
        {"sku": "SKU-9"},
    )
    assert (x2.aspect_ratio, x2.seed, x2.metadata) == ("1:1", None, {})


def test_yaml_list_or_mapping_with_prompts_key(write_file):
    as_list = load_prompts(write_file("a.yaml", "- prompt: one\n- {id: two, prompt: two}\n"))
    as_map = load_prompts(write_file("b.yml", "prompts:\n  - prompt: one\n  - just text\n"))
    assert [p.prompt for p in as_list.prompts] == ["one", "two"]
    assert [p.prompt for p in as_map.prompts] == ["one", "just text"]


@pytest.mark.parametrize(
    ("name", "text", "line", "field", "message"),
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": "broken"\n', 2, None, "malformed JSON"),
        ("empty.jsonl", '{"prompt": "ok"}\n{"prompt": ""}\n', 2, "prompt", "at least 1 char"),
        ("blank.jsonl", '{"prompt": "   "}\n', 1, "prompt", "the prompt is empty"),
        ("none.jsonl", '{"id": "a"}\n', 1, "prompt", "the prompt is missing"),
        ("unknown.jsonl", '{"prompt": "ok", "colour": "red"}\n', 1, "colour", "unknown field"),
        ("array.jsonl", '["a prompt"]\n', 1, None, "expected an object"),
        ("ratio.jsonl", '{"prompt": "ok", "aspect_ratio": "7:3"}\n', 1, "aspect_ratio", "'16:9'"),
        ("seed.jsonl", '{"prompt": "ok", "seed": -1}\n', 1, "seed", "greater than or equal"),
        ("id.jsonl", '{"id": "../etc", "prompt": "ok"}\n', 1, "id", "ids may hold letters"),
        (
            "dupe.jsonl",
            '{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n{"id": "a", "prompt": "z"}\n',
            3,
            "id",
            "duplicate id 'a': line 1 has the same id",
        ),
        (
            "dupe-content.jsonl",
            '{"prompt": "same"}\n{"prompt": "same"}\n',
            2,
            "id",
            "the same content",
        ),
        ("cells.csv", "id,prompt\na,one\nb,two,extra\n", 3, None, "expected 2 cells"),
        ("quote.csv", 'id,prompt\na,"unterminated\n', 2, None, "malformed CSV"),
        ("column.csv", "id,prompt,colour\na,one,red\n", 1, "colour", "unknown column 'colour'"),
        ("noprompt.csv", "id,text\na,one\n", 1, "prompt", "no 'prompt' column"),
        ("bad.yaml", "- prompt: ok\n- prompt: [unclosed\n", 3, None, "malformed YAML"),
        ("scalar.yaml", "just a string\n", 1, None, "expected a list of prompts"),
    ],
)
def test_bad_rows_name_file_line_and_field(write_file, name, text, line, field, message):
    path = write_file(name, text)
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    err = info.value
    assert (err.line, err.field) == (line, field)
    assert message in str(err)
    assert str(path) in str(err)
    if line is not None:
        assert f"line {line}" in str(err)


def test_oversize_prompt_says_how_long_it_is_and_the_limit(write_file):
    text = "x" * (MAX_PROMPT_CHARS + 5)
    with pytest.raises(PromptFileError) as info:
        load_prompts(write_file("big.jsonl", json.dumps({"prompt": text})))
    assert info.value.field == "prompt"
    assert f"{MAX_PROMPT_CHARS + 5} characters, at most {MAX_PROMPT_CHARS}" in str(info.value)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "absent.jsonl", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: (d / "empty.jsonl", (d / "empty.jsonl").write_text("\n  \n"))[0], "is empty"),
        (lambda d: (d / "p.txt", (d / "p.txt").write_text("a"))[0], "unknown prompt file type"),
        (
            lambda d: (
                d / "latin.jsonl",
                (d / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9"}'),
            )[0],
            "not UTF-8",
        ),
    ],
)
def test_unusable_files_are_named(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(PromptFileError) as info:
        load_prompts(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_skip_bad_rows_reports_them_and_keeps_the_good(write_file):
    path = write_file(
        "mixed.jsonl",
        '{"id": "a", "prompt": "ok"}\nnot json\n{"id": "b", "prompt": ""}\n'
        '{"id": "a", "prompt": "dupe"}\n{"id": "c", "prompt": "fine"}\n',
    )
    loaded = load_prompts(path, skip_bad_rows=True)
    assert [p.id for p in loaded.prompts] == ["a", "c"]
    assert [(r.line, r.field) for r in loaded.rejected] == [(2, None), (3, "prompt"), (4, "id")]
    assert "malformed JSON" in str(loaded.rejected[0])


def test_skip_bad_rows_still_fails_when_nothing_is_left(write_file):
    with pytest.raises(PromptFileError, match="no prompts; all 2 rows were bad"):
        load_prompts(write_file("bad.jsonl", "nope\nnope\n"), skip_bad_rows=True)


def test_prompt_file_read_from_gcs(gcs_bucket):
    from imagebatch.storage.gcs import GcsSink

    sink = GcsSink(gcs_bucket)
    sink.write("in/night.jsonl", GOOD_JSONL.encode(), content_type="text/plain", metadata={})
    sink.write("in/bad.csv", b"id,prompt\na,one\nb,\n", content_type="text/csv", metadata={})

    loaded = load_prompts(f"gs://{gcs_bucket}/in/night.jsonl")
    assert [p.prompt for p in loaded.prompts] == ["a red mug", "a blue mug"]
    with pytest.raises(PromptFileError, match=rf"gs://{gcs_bucket}/in/bad.csv, line 3, field"):
        load_prompts(f"gs://{gcs_bucket}/in/bad.csv")
    with pytest.raises(
        PromptFileError, match=rf"gs://{gcs_bucket}/in/nope.jsonl: .*no such object"
    ):
        load_prompts(f"gs://{gcs_bucket}/in/nope.jsonl")


def test_example_prompt_file_is_valid():
    from tests.conftest import ROOT

    loaded = load_prompts(ROOT / "examples" / "prompts.jsonl")
    assert len(loaded.prompts) >= 5
