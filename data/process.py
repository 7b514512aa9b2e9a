"""Raw problems → Alpaca-style records {prompt, response, metadata} within a token budget."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from data.readers import CODECONTESTS_SOURCES, language_name
from data.records import DataError, Record
from model.tokenizer import Tokenizer

TEMPLATE_VERSION = "alpaca-v2-correctness"  # v2: a correctness label line in the notes
PROMPT_TEMPLATE = """### Instruction:
{instruction}

### Input:
{input}

### Evaluation Notes:
{notes}

### Response:
"""
TRUNCATION_MARK = "\n[... description shortened ...]"
LANGUAGE_TAGS = {"PYTHON3": "python3", "PYTHON": "python2", "CPP": "cpp", "JAVA": "java"}
# The last line of the Evaluation Notes under `incorrect: tag`; evaluation prompts carry the
# "correct" one, so the model is asked for what it learned a correct solution looks like.
CORRECTNESS_LABELS = {True: "Label: correct solution.", False: "Label: incorrect solution."}
INCORRECT_POLICIES = ("tag", "drop", "keep")


@dataclass(frozen=True)
class ProcessConfig:
    max_length: int = 2048
    min_description_tokens: int = 128
    languages: tuple[str, ...] = ("PYTHON3",)
    max_solutions_per_task: int | None = None
    incorrect: str = "tag"  # incorrect solutions: tag (label in the prompt) | drop | keep

    def __post_init__(self) -> None:
        if self.incorrect not in INCORRECT_POLICIES:
            raise DataError(
                f"--incorrect {self.incorrect!r} is invalid: allowed {', '.join(INCORRECT_POLICIES)}"
            )
        if self.max_length < 64:
            raise DataError(f"--max-length {self.max_length} is invalid: must be >= 64")
        for lang in self.languages:
            if lang not in LANGUAGE_TAGS:
                raise DataError(
                    f"--languages: {lang!r} is unknown; allowed: {sorted(LANGUAGE_TAGS)}"
                )


@dataclass
class Problem:
    """One task before length fitting: the template's three fields and its solutions."""

    task_id: str
    source: str
    instruction: str
    input: str
    notes: str
    solutions: list[tuple[str, bool, str]]  # (code, is_correct, language)
    has_tests: bool


def render_prompt(instruction: str, input: str, notes: str) -> str:  # noqa: A002 - template field
    return PROMPT_TEMPLATE.format(
        instruction=instruction.strip(), input=input.strip(), notes=notes.strip()
    )


def labelled_notes(notes: str, is_correct: bool) -> str:
    """The notes with the correctness label as their last line."""
    return f"{notes.strip()}\n{CORRECTNESS_LABELS[is_correct]}"


def normalize_code(code: str) -> str:
    """LF line ends, no trailing spaces, one final newline: the form that is trained on."""
    lines = code.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def count_tokens(tok: Tokenizer, prompt: str, response: str) -> int:
    """bos + prompt + response + eos, tokenised the way the training loader does."""
    return 2 + len(tok.encode(prompt)) + len(tok.encode(response))


def _shorten(text: str, excess: int, tok: Tokenizer, floor: int) -> str | None:
    """`text` cut by at least `excess` tokens (not below `floor`), or None if it cannot shrink."""
    ids = tok.encode(text)
    keep = max(floor, len(ids) - excess - 16)
    return tok.decode(ids[:keep]) + TRUNCATION_MARK if keep < len(ids) else None


def fit_length(
    problem: Problem, code: str, tok: Tokenizer, cfg: ProcessConfig, notes: str | None = None
) -> tuple[str, str, dict]:
    """Shortens the description (instruction, then input) first, then truncates the code,
    re-checking the token count after each step. `notes` replaces the problem's notes."""
    notes = problem.notes if notes is None else notes
    fields = {"instruction": problem.instruction, "input": problem.input, "notes": notes}
    prompt = render_prompt(**fields)
    n = count_tokens(tok, prompt, code)
    info = {"n_tokens": n, "truncated": False, "shortened": False}
    for name in ("instruction", "input"):
        if n <= cfg.max_length:
            break
        shorter = _shorten(fields[name], n - cfg.max_length, tok, cfg.min_description_tokens)
        if shorter is not None:
            fields[name] = shorter
            prompt = render_prompt(**fields)
            info["shortened"] = True
            n = count_tokens(tok, prompt, code)
    while n > cfg.max_length:
        code_ids = tok.encode(code)
        budget = len(code_ids) - (n - cfg.max_length)
        if budget <= 0:
            raise DataError(f"{problem.task_id}: prompt alone exceeds max_length={cfg.max_length}")
        code = tok.decode(code_ids[:budget])
        info["truncated"] = True
        n = count_tokens(tok, prompt, code)
    info["n_tokens"] = n
    return prompt, code, info


def problem_records(problem: Problem, tok: Tokenizer, cfg: ProcessConfig) -> Iterator[Record]:
    """One record per solution; incorrect ones labelled, dropped or kept as `cfg.incorrect` says."""
    for index, (code, is_correct, language) in enumerate(
        problem.solutions[: cfg.max_solutions_per_task]
    ):
        if cfg.incorrect == "drop" and not is_correct:
            continue
        notes = labelled_notes(problem.notes, is_correct) if cfg.incorrect == "tag" else None
        prompt, response, info = fit_length(problem, code, tok, cfg, notes)
        yield Record(
            prompt,
            response,
            {
                "task_id": problem.task_id,
                "sample_id": f"{problem.task_id}#{index}",
                "source": problem.source,
                "is_correct": is_correct,
                "has_tests": problem.has_tests,
                "language": language,
                **info,
            },
        )


def dedupe_solutions(
    correct: list[tuple[str, str]], incorrect: list[tuple[str, str]]
) -> tuple[list[tuple[str, bool, str]], int]:
    """Unique normalised (code, language) solutions; code labelled both correct and incorrect
    is dropped from both. Returns ((code, is_correct, language) list, number dropped)."""
    good = dict.fromkeys((normalize_code(c), lang) for c, lang in correct)
    bad = dict.fromkeys((normalize_code(c), lang) for c, lang in incorrect)
    conflicts = {code for code, _ in good} & {code for code, _ in bad}
    kept = [(c, True, lang) for c, lang in good if c not in conflicts]
    kept += [(c, False, lang) for c, lang in bad if c not in conflicts]
    return kept, len(correct) + len(incorrect) - len(kept)


def mbpp_problem(raw: dict) -> Problem:
    tests = "\n".join(raw["test_list"])
    return Problem(
        task_id=f"mbpp/{raw['task_id']}",
        source="mbpp",
        instruction=raw["text"],
        input=f"Your code should pass these tests:\n{tests}",
        notes="Python 3. Define the function exactly as the tests call it.",
        solutions=[(normalize_code(raw["code"]), True, "python3")],
        has_tests=bool(raw["test_list"]),
    )


def tasks_problem(raw: dict) -> tuple[Problem, int]:
    correct = [(s["code"], "python3") for s in raw["solutions"] if s["is_correct"]]
    incorrect = [(s["code"], "python3") for s in raw["solutions"] if not s["is_correct"]]
    solutions, dropped = dedupe_solutions(correct, incorrect)
    tests = "\n".join(raw["tests"])
    problem = Problem(
        task_id=raw["task_id"],
        source="synthetic",
        instruction=raw["text"],
        input=f"Your code should pass these tests:\n{tests}",
        notes="Python 3. Define the function exactly as the tests call it.",
        solutions=solutions,
        has_tests=bool(raw["tests"]),
    )
    return problem, dropped


def humaneval_problem(raw: dict) -> Problem:
    return Problem(
        task_id=raw["task_id"],
        source="humaneval",
        instruction="Complete the following Python function.",
        input=raw["prompt"],
        notes=f"Python 3. The function `{raw['entry_point']}` is tested by hidden unit tests.",
        solutions=[(normalize_code(raw["prompt"] + raw["canonical_solution"]), True, "python3")],
        has_tests=True,
    )


def _solutions(block: dict, where: str, languages: tuple[str, ...]) -> list[tuple[str, str]]:
    langs, codes = block.get("language", []), block.get("solution", [])
    if len(langs) != len(codes):
        raise DataError(f"{where}: {len(langs)} languages for {len(codes)} solutions")
    named = [(code, language_name(lang, where)) for lang, code in zip(langs, codes, strict=True)]
    return [(code, LANGUAGE_TAGS[name]) for code, name in named if name in languages]


def codecontests_problem(raw: dict, cfg: ProcessConfig) -> tuple[Problem, int]:
    where = raw.get("_where", raw["name"])
    correct = _solutions(raw["solutions"], where, cfg.languages)
    incorrect = _solutions(raw["incorrect_solutions"], where, cfg.languages)
    solutions, dropped = dedupe_solutions(correct, incorrect)
    public = raw["public_tests"] or {}
    example = ""
    if public.get("input"):
        example = f"Example input:\n{public['input'][0]}\nExample output:\n{public['output'][0]}"
    n_tests = sum(
        len((raw[k] or {}).get("input", []))
        for k in ("public_tests", "private_tests", "generated_tests")
    )
    source = raw.get("source", 0)
    source_name = (
        CODECONTESTS_SOURCES[source] if isinstance(source, int) and source < 7 else str(source)
    )
    notes = (
        f"Language: Python 3. Read from standard input, write to standard output. "
        f"Difficulty: {raw.get('difficulty', 'unknown')}. Source: {source_name}."
    )
    problem = Problem(
        task_id=f"codecontests/{raw['name']}",
        source="codecontests",
        instruction=raw["description"],
        input=example,
        notes=notes,
        solutions=solutions,
        has_tests=n_tests > 0,
    )
    return problem, dropped
