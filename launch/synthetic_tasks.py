"""A verifiable programming-task set the project writes itself (the demo's CodeContests stand-in).

Each task is a small Python function: a statement, three assert tests, the correct solution and
mutants of it (off-by-one, wrong operator, flipped comparison, missing case, wrong initial
value). Every solution is labelled `is_correct` by actually running the tests in the sandbox,
so an equivalent mutant is labelled correct, as it should be.

    python -m launch.synthetic_tasks --out tasks.jsonl [--variants 8 --seed 0]

Output lines: {task_id, text, entry_point, tests, solutions: [{code, is_correct, mutation}]}.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from runtime.cli import ArgumentParser, entry_point
from runtime.integrity import atomic_write_text
from runtime.progress import Progress


@dataclass(frozen=True)
class Family:
    name: str
    text: str  # statement, with {p} for the variant parameter
    code: str  # correct solution, with {p}
    inputs: str  # kind of generated inputs: ints | int | str | pair | list2
    params: tuple


FAMILIES = [
    Family(
        "sum_above",
        "Write a function sum_above(nums) that returns the sum of the numbers in the list nums that are greater than {p}.",
        "def sum_above(nums):\n    total = 0\n    for x in nums:\n        if x > {p}:\n            total += x\n    return total\n",
        "ints",
        (0, 3, 5, 10, -2, 7, 1, 20),
    ),
    Family(
        "count_char",
        "Write a function count_char(s) that returns how many times the character '{p}' occurs in the string s.",
        "def count_char(s):\n    count = 0\n    for ch in s:\n        if ch == '{p}':\n            count += 1\n    return count\n",
        "str",
        tuple("aeiostnrl"),
    ),
    Family(
        "scale_list",
        "Write a function scale_list(nums) that returns a new list with every number of nums multiplied by {p}.",
        "def scale_list(nums):\n    return [x * {p} for x in nums]\n",
        "ints",
        (2, 3, 4, 5, 7, 10, -1, 6),
    ),
    Family(
        "power_sum",
        "Write a function power_sum(n) that returns the sum of i**{p} for i from 1 to n inclusive.",
        "def power_sum(n):\n    total = 0\n    for i in range(1, n + 1):\n        total += i ** {p}\n    return total\n",
        "int",
        (1, 2, 3, 4),
    ),
    Family(
        "count_greater",
        "Write a function count_greater(nums) that returns how many numbers in nums are greater than or equal to {p}.",
        "def count_greater(nums):\n    count = 0\n    for x in nums:\n        if x >= {p}:\n            count += 1\n    return count\n",
        "ints",
        (0, 2, 4, 6, 8, -3, 12, 1),
    ),
    Family(
        "rotate_left",
        "Write a function rotate_left(lst) that rotates the list lst to the left by {p} positions (wrapping around) and returns the new list.",
        "def rotate_left(lst):\n    if not lst:\n        return []\n    k = {p} % len(lst)\n    return lst[k:] + lst[:k]\n",
        "ints",
        (1, 2, 3, 4, 5),
    ),
    Family(
        "clamp_all",
        "Write a function clamp_all(nums) that returns the list nums with every value limited to the range from 0 to {p} inclusive.",
        "def clamp_all(nums):\n    result = []\n    for x in nums:\n        if x < 0:\n            result.append(0)\n        elif x > {p}:\n            result.append({p})\n        else:\n            result.append(x)\n    return result\n",
        "ints",
        (5, 8, 10, 3, 12, 6),
    ),
    Family(
        "repeat_words",
        "Write a function repeat_words(s) that returns the string s with every word repeated {p} times, words separated by single spaces.",
        "def repeat_words(s):\n    words = []\n    for w in s.split():\n        words.extend([w] * {p})\n    return ' '.join(words)\n",
        "str",
        (2, 3),
    ),
    Family(
        "factorial",
        "Write a function factorial(n) that returns n! (the product of the integers from 1 to n), with factorial(0) == 1.",
        "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
        "int",
        ("",),
    ),
    Family(
        "fibonacci",
        "Write a function fibonacci(n) that returns the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1.",
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
        "int",
        ("",),
    ),
    Family(
        "is_prime",
        "Write a function is_prime(n) that returns True if n is a prime number and False otherwise.",
        "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
        "int",
        ("",),
    ),
    Family(
        "gcd",
        "Write a function gcd(a, b) that returns the greatest common divisor of the non-negative integers a and b.",
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
        "pair",
        ("",),
    ),
    Family(
        "digit_sum",
        "Write a function digit_sum(n) that returns the sum of the decimal digits of the non-negative integer n.",
        "def digit_sum(n):\n    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n    return total\n",
        "int",
        ("",),
    ),
    Family(
        "max_gap",
        "Write a function max_gap(nums) that returns the difference between the largest and the smallest number in the non-empty list nums.",
        "def max_gap(nums):\n    return max(nums) - min(nums)\n",
        "ints",
        ("",),
    ),
    Family(
        "running_sum",
        "Write a function running_sum(nums) that returns the list of prefix sums of nums.",
        "def running_sum(nums):\n    result = []\n    total = 0\n    for x in nums:\n        total += x\n        result.append(total)\n    return result\n",
        "ints",
        ("",),
    ),
    Family(
        "count_vowels",
        "Write a function count_vowels(s) that returns the number of vowels (a, e, i, o, u) in the lowercase string s.",
        "def count_vowels(s):\n    count = 0\n    for ch in s:\n        if ch in 'aeiou':\n            count += 1\n    return count\n",
        "str",
        ("",),
    ),
    Family(
        "is_palindrome",
        "Write a function is_palindrome(s) that returns True if the string s reads the same forwards and backwards.",
        "def is_palindrome(s):\n    return s == s[::-1]\n",
        "str",
        ("",),
    ),
    Family(
        "reverse_words",
        "Write a function reverse_words(s) that returns the words of s in reverse order, separated by single spaces.",
        "def reverse_words(s):\n    return ' '.join(s.split()[::-1])\n",
        "str",
        ("",),
    ),
    Family(
        "second_largest",
        "Write a function second_largest(nums) that returns the second largest distinct value in nums, or None if there is none.",
        "def second_largest(nums):\n    values = sorted(set(nums))\n    if len(values) < 2:\n        return None\n    return values[-2]\n",
        "ints",
        ("",),
    ),
    Family(
        "dedupe",
        "Write a function dedupe(lst) that returns lst without repeated elements, keeping the first occurrence of each in order.",
        "def dedupe(lst):\n    seen = set()\n    result = []\n    for x in lst:\n        if x not in seen:\n            seen.add(x)\n            result.append(x)\n    return result\n",
        "ints",
        ("",),
    ),
    Family(
        "triangle",
        "Write a function triangle(n) that returns the n-th triangular number 1 + 2 + ... + n.",
        "def triangle(n):\n    total = 0\n    for i in range(1, n + 1):\n        total += i\n    return total\n",
        "int",
        ("",),
    ),
    Family(
        "count_evens",
        "Write a function count_evens(nums) that returns how many numbers in nums are even.",
        "def count_evens(nums):\n    count = 0\n    for x in nums:\n        if x % 2 == 0:\n            count += 1\n    return count\n",
        "ints",
        ("",),
    ),
    Family(
        "bit_length",
        "Write a function bit_length(n) that returns the number of binary digits of the positive integer n.",
        "def bit_length(n):\n    count = 0\n    while n > 0:\n        n //= 2\n        count += 1\n    return count\n",
        "int",
        ("",),
    ),
    Family(
        "merge_sorted",
        "Write a function merge_sorted(a, b) that merges two sorted lists into one sorted list.",
        "def merge_sorted(a, b):\n    i = j = 0\n    result = []\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            result.append(a[i])\n            i += 1\n        else:\n            result.append(b[j])\n            j += 1\n    return result + a[i:] + b[j:]\n",
        "list2",
        ("",),
    ),
]

MUTATIONS = [
    ("off-by-one", r"range\(1, (\w+) \+ 1\)", r"range(1, \1)"),
    ("off-by-one", r"range\(2, (\w+) \+ 1\)", r"range(2, \1)"),
    ("off-by-one", r"range\((\w+)\)", r"range(\1 - 1)"),
    ("flipped comparison", r" > ", " >= "),
    ("flipped comparison", r" >= ", " > "),
    ("flipped comparison", r" <= ", " < "),
    ("flipped comparison", r" < ", " <= "),
    ("wrong operator", r" \+ ", " - "),
    ("wrong operator", r" \* ", " + "),
    ("wrong operator", r" - ", " + "),
    ("wrong operator", r" % ", " // "),
    ("wrong operator", r"\+= ", "-= "),
    ("wrong initial value", r"= 0\n", "= 1\n"),
    ("wrong initial value", r"result = 1\n", "result = 0\n"),
    ("wrong slice", r"\[::-1\]", "[::1]"),
    ("wrong slice", r"\[k:\] \+ lst\[:k\]", "[:k] + lst[k:]"),
    ("missing case", r"    if not lst:\n        return \[\]\n", ""),
    ("missing case", r"    if n < 2:\n        return False\n", ""),
    ("missing case", r"    if len\(values\) < 2:\n        return None\n", ""),
    ("flipped result", r"return True", "return False"),
]
WORDS = "apple banana level noon river stone tree moon radar sun code task test data list value"


def make_inputs(kind: str, rng: random.Random) -> list[tuple]:
    """Three argument tuples of the given kind."""
    if kind == "ints":
        return [(rng.sample(range(-5, 25), rng.randint(3, 7)),) for _ in range(3)]
    if kind == "int":
        return [(n,) for n in rng.sample(range(1, 30), 3)]
    if kind == "pair":
        return [(rng.randint(1, 60), rng.randint(1, 60)) for _ in range(3)]
    if kind == "list2":
        return [
            (sorted(rng.sample(range(30), 3)), sorted(rng.sample(range(30), 4))) for _ in range(3)
        ]
    words = WORDS.split()
    return (
        [(" ".join(rng.sample(words, rng.randint(1, 4))),) for _ in range(3)]
        if kind == "str"
        else []
    )


def call_text(fn: str, args: tuple) -> str:
    return f"{fn}({', '.join(repr(a) for a in args)})"


def tests_for(code: str, fn: str, inputs: list[tuple]) -> list[str]:
    namespace: dict = {}
    exec(code, namespace)  # the generator's own, trusted solution computes the expected values
    return [f"assert {call_text(fn, args)} == {namespace[fn](*args)!r}" for args in inputs]


def mutants(code: str, limit: int, rng: random.Random) -> list[tuple[str, str]]:
    found = []
    for label, pattern, replacement in rng.sample(MUTATIONS, len(MUTATIONS)):
        mutated = re.sub(pattern, replacement, code, count=1)
        if mutated != code and all(mutated != m for _, m in found):
            found.append((label, mutated))
        if len(found) >= limit:
            break
    return found


def generate_tasks(variants: int = 8, seed: int = 0, mutants_per_task: int = 3) -> list[dict]:
    rng = random.Random(seed)
    tasks = []
    for family in FAMILIES:
        for v, param in enumerate(family.params[:variants]):
            for repeat in range(max(1, variants // len(family.params[:variants]))):
                code = family.code.replace("{p}", str(param))
                tests = tests_for(code, family.name, make_inputs(family.inputs, rng))
                solutions = [{"code": code, "mutation": None}] + [
                    {"code": m, "mutation": label}
                    for label, m in mutants(code, mutants_per_task, rng)
                ]
                tasks.append(
                    {
                        "task_id": f"tasks/{family.name}-{v}-{repeat}",
                        "entry_point": family.name,
                        "text": family.text.replace("{p}", str(param)),
                        "tests": tests,
                        "solutions": solutions,
                    }
                )
    return tasks


def label_by_running(tasks: list[dict], workers: int = 2) -> None:
    """Sets is_correct on every solution by running its tests in the sandbox."""
    from evaluation.sandbox import Limits, Sandbox

    sandbox = Sandbox(Limits(timeout_s=2, cpu_s=2, memory_mb=512))  # mutants may loop forever
    jobs = [
        (s, s["code"] + "\n\n" + "\n".join(t["tests"]) + "\n")
        for t in tasks
        for s in t["solutions"]
    ]

    def label(job: tuple[dict, str]) -> None:
        job[0]["is_correct"] = sandbox.run(job[1]).passed
        progress.update()

    with (
        Progress("  labelled", len(jobs), "solutions") as progress,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        list(pool.map(label, jobs))


def write_tasks(path: Path, variants: int = 8, seed: int = 0, workers: int = 2) -> dict:
    tasks = generate_tasks(variants, seed)
    label_by_running(tasks, workers)
    atomic_write_text(path, "".join(json.dumps(t) + "\n" for t in tasks))
    solutions = [s for t in tasks for s in t["solutions"]]
    return {
        "tasks": len(tasks),
        "solutions": len(solutions),
        "correct": sum(s["is_correct"] for s in solutions),
        "reference_failures": sum(not t["solutions"][0]["is_correct"] for t in tasks),
    }


@entry_point
def main() -> None:
    parser = ArgumentParser(description="Generate the verifiable synthetic task set.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    a = parser.parse_args()
    print(json.dumps(write_tasks(a.out, a.variants, a.seed, a.workers)))


if __name__ == "__main__":
    main()
