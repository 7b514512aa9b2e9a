"""data.prepare / data.validate on real MBPP and HumanEval and on upstream-schema CodeContests."""

from __future__ import annotations

import json
import shutil

import pytest

from data.prepare import main as prepare_main
from data.prepare import prepare
from data.process import ProcessConfig
from data.records import DataError, read_records
from data.validate import main as validate_main
from data.validate import validate
from runtime.integrity import verify_sha256sums
from tests.codecontests_fixture import fixture_problems, problem, write_jsonl, write_parquet

SPLIT_FILES = ["train", "validation", "test", "train_small", "validation_small"]


@pytest.fixture(scope="module")
def mbpp_prepared(tmp_path_factory, mbpp_path, llama2_tokenizer_path):
    out = tmp_path_factory.mktemp("mbpp")
    summary = prepare("mbpp", mbpp_path.parent, out, llama2_tokenizer_path, ProcessConfig())
    return out, summary


def test_mbpp_real_data_processed_and_split_upstream(mbpp_prepared, mbpp_path):
    out, summary = mbpp_prepared
    splits = {name: read_records(out / "processed" / f"{name}.jsonl") for name in SPLIT_FILES}
    assert summary["problems"] == 974
    assert summary["records"]["test"] == 500 and summary["records"]["validation"] == 90
    assert summary["records"]["train"] + summary["decontaminated"] == 384
    test_ids = {int(r.task_id.split("/")[1]) for r in splits["test"]}
    assert test_ids == set(range(11, 511))
    assert len(splits["train_small"]) == 100 and len(splits["validation_small"]) == 32
    record = next(r for r in splits["test"] if r.task_id == "mbpp/11")
    assert record.prompt.startswith("### Instruction:\n") and record.prompt.endswith(
        "### Response:\n"
    )
    assert "### Input:\nYour code should pass these tests:\nassert " in record.prompt
    assert "\r" not in record.response and record.response.endswith("\n")
    expected = {
        "source": "mbpp",
        "is_correct": True,
        "has_tests": True,
        "language": "python3",
        "sample_id": "mbpp/11#0",
    }
    assert record.metadata.items() >= expected.items()
    assert all(r.metadata["n_tokens"] <= 2048 for s in splits.values() for r in s)
    stats = list((out / "stats").glob("*_summary.json"))
    assert len(stats) == 1 and json.loads(stats[0].read_text())["is_correct_ratio"] == 1.0
    verify_sha256sums(out / "processed")
    assert validate(out, mbpp=mbpp_path) == []


def test_humaneval_from_the_package_is_test_only(tmp_path, llama2_tokenizer_path):
    summary = prepare("humaneval", None, tmp_path, llama2_tokenizer_path, ProcessConfig())
    test = read_records(tmp_path / "processed" / "test.jsonl")
    assert summary["records"]["test"] == 164 and summary["records"]["train"] == 0
    assert test[0].task_id == "HumanEval/0" and "def has_close_elements" in test[0].response


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_codecontests_upstream_schema(tmp_path, fmt, llama2_tokenizer_path):
    problems = fixture_problems()
    writer = write_jsonl if fmt == "jsonl" else write_parquet
    writer(problems, tmp_path / "raw" / f"train-00000-of-00001.{fmt}")
    summary = prepare(
        "codecontests",
        tmp_path / "raw",
        tmp_path / "out",
        llama2_tokenizer_path,
        ProcessConfig(),
        humaneval_for_decontamination=False,
    )
    records = [
        r
        for name in ("train", "validation", "test")
        for r in read_records(tmp_path / "out" / "processed" / f"{name}.jsonl")
    ]
    by_task = {}
    for r in records:
        by_task.setdefault(r.task_id, []).append(r)
    sum_task = by_task["codecontests/0001_A. Sum"]
    assert [(r.response, r.metadata["is_correct"]) for r in sum_task] == [
        ("a, b = map(int, input().split())\nprint(a + b)\n", True),  # CRLF copy deduplicated
        ("a, b = map(int, input().split())\nprint(a - b)\n", False),
        ("print(0)\n", False),
    ]  # C++ and Python 2 dropped by the language filter
    assert all(r.metadata["language"] == "python3" and r.metadata["has_tests"] for r in records)
    conflict = by_task["codecontests/0002_B. Conflict"]
    assert [r.response for r in conflict] == ["x = 1\nprint(x)\n"]  # labelled both ways: dropped
    assert "Example input:\n1 2\n\nExample output:\n3" in sum_task[0].prompt
    assert summary["problems"] == 12 and 0 < summary["is_correct_ratio"] < 1
    assert summary["dropped_duplicates"] == 3  # the CRLF copy and both sides of the conflict
    assert validate(tmp_path / "out", humaneval=False) == []


def test_seeded_splits_are_deterministic_and_disjoint(tmp_path, llama2_tokenizer_path):
    write_jsonl(fixture_problems(40), tmp_path / "raw" / "cc.jsonl")

    def split_tasks(seed, name):
        out = tmp_path / f"out-{seed}-{name}"
        prepare(
            "codecontests",
            tmp_path / "raw",
            out,
            llama2_tokenizer_path,
            ProcessConfig(),
            seed=seed,
            humaneval_for_decontamination=False,
        )
        return {
            s: {r.task_id for r in read_records(out / "processed" / f"{s}.jsonl")}
            for s in ("train", "validation", "test")
        }

    a, b, c = split_tasks(42, "a"), split_tasks(42, "b"), split_tasks(7, "c")
    assert a == b and a != c
    assert not (a["train"] & a["validation"]) and not (a["train"] & a["test"])
    assert not (a["validation"] & a["test"])
    assert [len(a[s]) for s in ("train", "validation", "test")] == [32, 4, 4]


def test_length_policy_shortens_description_before_truncating_code(tmp_path, llama2_tokenizer_path):
    long_desc = "Read the numbers carefully and add them. " * 200
    long_code = "".join(f"x{i} = {i}\n" for i in range(300)) + "print(x1)\n"
    probs = [
        problem("L1", long_desc, [(3, "print(1)\n")], []),
        problem("L2", long_desc, [(3, long_code)], []),
    ]
    write_jsonl(probs, tmp_path / "raw" / "cc.jsonl")
    cfg = ProcessConfig(max_length=400, min_description_tokens=64)
    prepare(
        "codecontests",
        tmp_path / "raw",
        tmp_path / "out",
        llama2_tokenizer_path,
        cfg,
        humaneval_for_decontamination=False,
    )
    records = {
        r.task_id: r
        for s in ("train", "validation", "test")
        for r in read_records(tmp_path / "out" / "processed" / f"{s}.jsonl")
    }
    short = records["codecontests/L1"].metadata
    assert short["shortened"] and not short["truncated"] and short["n_tokens"] <= 400
    long = records["codecontests/L2"]
    assert (
        long.metadata["shortened"]
        and long.metadata["truncated"]
        and long.metadata["n_tokens"] <= 400
    )
    assert long.response.startswith("x0 = 0\nx1 = 1\n") and "description shortened" in long.prompt
    assert validate(tmp_path / "out", tokenizer=llama2_tokenizer_path, humaneval=False) == []


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"name": "x"\n', r"cc.jsonl:1: invalid JSON"),
        (
            json.dumps({"name": "x", "description": "d"}) + "\n",
            r"cc.jsonl:1: missing field\(s\) public_tests",
        ),
        (
            json.dumps(problem("x", "d", [(9, "print(1)")], [])) + "\n",
            r"cc.jsonl:1: unknown language 9",
        ),
    ],
    ids=["invalid-json", "missing-field", "unknown-language"],
)
def test_bad_input_names_file_and_line_and_writes_nothing(
    tmp_path, llama2_tokenizer_path, content, message, capsys
):
    (tmp_path / "raw").mkdir()
    good = json.dumps(problem("ok", "fine", [(3, "print(1)\n")], [])) + "\n"
    (tmp_path / "raw" / "cc.jsonl").write_text(good + content.replace("cc.jsonl:1", ""))
    with pytest.raises(DataError, match=message.replace(":1:", ":2:")):
        prepare(
            "codecontests",
            tmp_path / "raw",
            tmp_path / "out",
            llama2_tokenizer_path,
            ProcessConfig(),
        )
    assert not (tmp_path / "out").exists()
    argv = [
        "--dataset",
        "codecontests",
        "--source-dir",
        str(tmp_path / "raw"),
        "--output-dir",
        str(tmp_path / "out"),
        "--tokenizer",
        str(llama2_tokenizer_path),
    ]
    assert prepare_main(argv) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_validator_lists_every_violation(mbpp_prepared, mbpp_path, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(mbpp_prepared[0], out)
    processed = out / "processed"
    train = processed / "train.jsonl"
    test_lines = (processed / "test.jsonl").read_text().splitlines()
    leaked = json.loads(test_lines[0])
    leaked["metadata"]["task_id"] = "mbpp/9999"  # a test problem smuggled into train
    overlap = json.loads(test_lines[1])  # a test task id in train
    too_long = json.loads(train.read_text().splitlines()[0])
    too_long["metadata"]["n_tokens"] = 5000
    broken = {"prompt": 1, "response": "x"}
    lines = train.read_text().splitlines()[1:] + [
        json.dumps(x) for x in (leaked, overlap, too_long, broken)
    ]
    train.write_text("\n".join(lines) + "\n")
    problems = validate(out, mbpp=mbpp_path)
    text = "\n".join(problems)
    assert "train.jsonl: SHA256 mismatch" in text
    assert "missing field `metadata`" in text and "`prompt` is int" in text
    assert "5000 tokens > max_length 2048" in text
    assert "splits train and test share 1 task id(s), e.g. ['mbpp/12']" in text
    assert "contains mbpp/11 text, mbpp/11 code" in text
    assert validate_main([str(out), "--mbpp", str(mbpp_path)]) == 1
    assert "violation(s)" in capsys.readouterr().out


@pytest.mark.parametrize("policy", ["tag", "drop", "keep"])
def test_incorrect_solutions_are_tagged_dropped_or_kept(tmp_path, llama2_tokenizer_path, policy):
    write_jsonl(fixture_problems(), tmp_path / "raw" / "train.jsonl")
    assert prepare_main(["--dataset", "codecontests", "--source-dir", str(tmp_path / "raw"),
                         "--output-dir", str(tmp_path / "out"), "--tokenizer", str(llama2_tokenizer_path),
                         "--incorrect", policy]) == 0  # fmt: skip
    records = [r for name in ("train", "validation", "test")
               for r in read_records(tmp_path / "out" / "processed" / f"{name}.jsonl")]  # fmt: skip
    correct = [r for r in records if r.metadata["is_correct"]]
    incorrect = [r for r in records if not r.metadata["is_correct"]]
    assert correct
    if policy == "tag":
        assert incorrect and all("Label: incorrect solution." in r.prompt for r in incorrect)
        assert all("Label: correct solution." in r.prompt for r in correct)
    elif policy == "drop":
        assert not incorrect
    else:
        assert incorrect and not any("Label:" in r.prompt for r in records)
    manifest = json.loads((tmp_path / "out" / "processed" / "manifest.json").read_text())
    assert manifest["config"]["incorrect"] == policy and manifest["template"].startswith(
        "alpaca-v2"
    )
    assert validate(tmp_path / "out", humaneval=False) == []


def test_validator_catches_a_wrong_correctness_label(tmp_path, llama2_tokenizer_path):
    write_jsonl(fixture_problems(), tmp_path / "raw" / "train.jsonl")
    prepare("codecontests", tmp_path / "raw", tmp_path / "out", llama2_tokenizer_path,
            ProcessConfig(incorrect="tag"), humaneval_for_decontamination=False)  # fmt: skip
    train = tmp_path / "out" / "processed" / "train.jsonl"
    lines = train.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"is_correct": false' in line)
    lines[index] = lines[index].replace("Label: incorrect solution.", "Label: correct solution.")
    train.write_text("\n".join(lines) + "\n")
    problems = validate(tmp_path / "out", humaneval=False)
    assert any(f"train.jsonl:{index + 1}: prompt lacks the label" in p for p in problems)


def test_tokenized_cache_key_changes_with_the_incorrect_policy(tmp_path, llama2_tokenizer_path):
    from data.tokenized import cache_key
    from model.tokenizer import Tokenizer

    write_jsonl(fixture_problems(), tmp_path / "raw" / "train.jsonl")
    keys = set()
    for policy in ("tag", "keep"):
        prepare("codecontests", tmp_path / "raw", tmp_path / policy, llama2_tokenizer_path,
                ProcessConfig(incorrect=policy), humaneval_for_decontamination=False)  # fmt: skip
        keys.add(
            cache_key(
                tmp_path / policy / "processed" / "train.jsonl", Tokenizer(llama2_tokenizer_path)
            )
        )
    assert len(keys) == 2
