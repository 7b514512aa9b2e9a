"""The real LLaMA-2 tokenizer through model.Tokenizer."""

from __future__ import annotations

import inspect
import json

import pytest

from model import Tokenizer

PYTHON_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    inspect.getsource(json.dumps),
    "class Stack:\n\tdef push(self, x):\n\t\tself.items.append(x)  # tabs\n\n\n",
    'print(f"{x!r:>10} \\u00e9 ünïcödé 中文 😀")\r\n',
]


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
    return Tokenizer(llama2_tokenizer_path)


def test_llama2_tokenizer_special_ids(tok):
    assert tok.n_words == 32000
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad piece: pad with eos


def test_known_encoding(tok):
    assert tok.encode("def add(a, b):") == [822, 788, 29898, 29874, 29892, 289, 1125]
    assert tok.encode("x", bos=True, eos=True) == [1, 921, 2]


@pytest.mark.parametrize("code", PYTHON_SNIPPETS)
def test_exact_round_trip_on_python_code(tok, code):
    assert tok.decode(tok.encode(code)) == code


def test_round_trip_on_mbpp_solutions(tok, mbpp_path):
    solutions = [json.loads(line)["code"] for line in mbpp_path.read_text().splitlines()]
    broken = [i for i, code in enumerate(solutions) if tok.decode(tok.encode(code)) != code]
    assert not broken, f"{len(broken)} MBPP solutions do not round-trip, first {broken[:5]}"


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
