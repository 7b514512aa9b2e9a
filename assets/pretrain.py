"""The micro base's pretraining (`prepare_assets.py --step 5`): real Python source that every
machine has offline — the interpreter's standard library, test folders left out — with a held-out
slice, and nothing that overlaps an evaluation text.

    corpus_files      the .py files of `assets.micro.corpus_dirs` (default: the stdlib)
    LeakFilter        drops every file containing a HumanEval / MBPP-test / synthetic-task text
    corpus_key        SHA256 over the kept files, the leak texts and the settings that shape the
                      base: the cache key of micro-mtp (same key → the cached base is reused)
    chunk_records     files cut at line boundaries into records of at most `seq_len` tokens;
                      a deterministic `holdout_fraction` of the files (at least one) is the held-out split

The pretraining itself is a `train_wmtp.py` run (baseline weights, all four heads, the MTP loss)
on these records, so it checkpoints, resumes after a kill and shows progress like any run.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import sysconfig
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from data.leakage import BenchmarkIndex, normalize_text
from data.readers import read_tasks
from data.records import Record
from model.tokenizer import Tokenizer
from runtime.config import MicroConfig

PRETRAIN_VERSION = "stdlib-mtp-v1"  # bump when the corpus or the pretraining recipe changes
SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class SourceFile:
    name: str  # relative to its corpus dir, prefixed by the dir's own name
    text: str


def default_corpus_dirs() -> list[Path]:
    return [Path(sysconfig.get_paths()["stdlib"])]


def corpus_files(dirs: Iterable[Path], max_bytes: int) -> list[SourceFile]:
    """UTF-8 .py files under `dirs`, sorted, test folders skipped, up to `max_bytes` in all."""
    files, used = [], 0
    for root in dirs:
        for path in sorted(Path(root).glob("**/*.py")):
            if SKIPPED_PARTS & set(path.relative_to(root).parts):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            files.append(SourceFile(f"{Path(root).name}/{path.relative_to(root)}", text))
            used += len(text)
            if used >= max_bytes:
                return files
    return files


class LeakFilter:
    """Evaluation texts a pretraining file must not contain: HumanEval (the package), the MBPP
    test split (when `mbpp` is given) and every synthetic task's statement, tests and solutions
    (when `tasks` is given)."""

    def __init__(self, mbpp: Path | None = None, tasks: Path | None = None):
        self.index = BenchmarkIndex.build(mbpp=mbpp, humaneval=True)
        if tasks is not None:
            for task in read_tasks(tasks):
                self.index.add(f"{task['task_id']} text", task["text"])
                self.index.add(f"{task['task_id']} tests", "\n".join(task["tests"]))
                for i, solution in enumerate(task["solutions"]):
                    self.index.add(f"{task['task_id']} solution {i}", solution["code"])

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.index.texts]

    def split(self, files: list[SourceFile]) -> tuple[list[SourceFile], dict[str, list[str]]]:
        """(files without any evaluation text, {dropped file: the texts it contained})."""
        normalised = [normalize_text(f.text) for f in files]
        whole = {n: i for i, n in enumerate(normalised)}
        joined = "\0".join(normalised)  # one search per text; offsets map back to files
        starts = list(itertools.accumulate((len(n) + 1 for n in normalised), initial=0))
        dropped: dict[str, list[str]] = {}
        for label, text in self.index.texts:
            if len(text) < 48:  # short texts only match a whole file, as the data check does
                hits = [whole[text]] if text in whole else []
            else:
                hits, at = [], joined.find(text)
                while at >= 0:
                    hits.append(bisect.bisect_right(starts, at) - 1)
                    at = joined.find(text, starts[hits[-1] + 1])
            for i in hits:
                dropped.setdefault(files[i].name, []).append(label)
        return [f for f in files if f.name not in dropped], dropped


def corpus_key(files: list[SourceFile], leak_texts: list[str], micro: MicroConfig) -> str:
    """The cache key of the pretrained base: every kept file, the leak texts, the settings."""
    digest = hashlib.sha256(PRETRAIN_VERSION.encode())
    settings = {k: v for k, v in asdict(micro).items() if k != "corpus_dirs"}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for text in sorted(leak_texts):
        digest.update(hashlib.sha256(text.encode()).digest())
    for f in files:
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.text.encode()).digest())
    return digest.hexdigest()


def held_out_names(files: list[SourceFile], fraction: float) -> set[str]:
    """A deterministic `fraction` of the files (at least one): those whose names hash lowest."""
    order = sorted(files, key=lambda f: hashlib.sha256(f.name.encode()).hexdigest())
    return {f.name for f in order[: max(1, round(fraction * len(files)))]}


def chunks(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """`text` cut at line boundaries into pieces of at most `max_tokens` tokens (a longer line
    is cut at `max_tokens` tokens)."""
    pieces, current, used = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(tokenizer.encode(line))
        if n > max_tokens:  # one enormous line (data tables): its tokens in slices
            ids = tokenizer.encode(line)
            pieces += [tokenizer.decode(ids[i : i + max_tokens]) for i in range(0, n, max_tokens)]
            continue
        if used + n > max_tokens and current:
            pieces.append("".join(current))
            current, used = [], 0
        current.append(line)
        used += n
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def chunk_records(
    files: list[SourceFile], tokenizer: Tokenizer, seq_len: int, holdout_fraction: float
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records: prompt empty, the code as the response (bos + code + eos fit
    `seq_len`), every token a target."""
    train, held_out = [], []
    chosen = held_out_names(files, holdout_fraction)
    for f in files:
        split = held_out if f.name in chosen else train
        for i, piece in enumerate(chunks(f.text, tokenizer, seq_len - 2)):
            split.append(Record("", piece, {
                "task_id": f.name, "sample_id": f"{f.name}#{i}", "source": "python-stdlib",
                "is_correct": True, "has_tests": False, "language": "python",
            }))  # fmt: skip
    return train, held_out
