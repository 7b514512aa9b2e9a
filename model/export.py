"""Export a model dir to other formats: `python -m model.export CKPT OUT --format hf|wmtp`.

    hf    a directory that `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads as a
          Llama model whose logits equal WMTP's head 0, with `tokenizer.model` and its configs so
          that `AutoTokenizer` works; the extra heads go beside it in `mtp_heads.safetensors`
          with `mtp_heads.json` saying how to use them
    wmtp  back from such a directory (or any HF LLaMA) to a WMTP model dir (all heads)

CKPT is a WMTP model dir (e.g. `<run>/export/final`), a Meta dir, or for `--format wmtp` an HF
directory. Files are written into a temporary directory renamed into place, with SHA256SUMS.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.args import ModelArgs
from model.hf import (
    HF_WEIGHTS,
    MTP_HEADS,
    MTP_NOTE,
    args_to_hf_config,
    convert_hf_llama,
    mtp_note,
    to_hf_state,
    tokenizer_files,
)
from model.tokenizer import Tokenizer
from model.weights import load_checkpoint_dir, save_model_dir
from runtime.cli import ArgumentParser, entry_point
from runtime.errors import InputError
from runtime.integrity import atomic_write_text, write_sha256sums

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_hf(
    ckpt: Path, out: Path, dtype: torch.dtype | None = None, tokenizer: Path | None = None
) -> Path:
    """Writes the HF directory for a WMTP model dir (see the module docstring)."""
    args, state = load_checkpoint_dir(ckpt)
    tokenizer = tokenizer or ckpt / "tokenizer.model"
    if not tokenizer.is_file():
        raise InputError(f"{ckpt}: no tokenizer.model beside the weights (pass --tokenizer)")
    tok = Tokenizer(tokenizer)
    dtype = dtype or next(iter(state.values())).dtype
    hf_state, heads = to_hf_state(args, {k: v.to(dtype).contiguous() for k, v in state.items()})
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(hf_state, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
    files = [HF_WEIGHTS, "config.json", "generation_config.json", "tokenizer.model"]
    config = args_to_hf_config(args, dtype, tok.bos_id, tok.eos_id)
    atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "temperature": 0.2,
        "top_p": 0.95,
    }
    atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    for name, content in tokenizer_files(tok.bos_id, tok.eos_id, tok.pad_id).items():
        atomic_write_text(tmp / name, json.dumps(content, indent=2) + "\n")
        files.append(name)
    if heads:
        save_file(heads, str(tmp / MTP_HEADS), metadata={"format": "pt"})
        atomic_write_text(tmp / MTP_NOTE, json.dumps(mtp_note(args, heads), indent=2) + "\n")
        files += [MTP_HEADS, MTP_NOTE]
    write_sha256sums(tmp, files)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def import_wmtp(hf_dir: Path, out: Path) -> Path:
    """An HF directory (with `mtp_heads.safetensors` when it came from `export_hf`) → WMTP dir."""
    args, state = convert_hf_llama(hf_dir)
    heads_file = hf_dir / MTP_HEADS
    if heads_file.is_file():
        note = json.loads((hf_dir / MTP_NOTE).read_text())
        args = ModelArgs.from_dict(note["params"])
        with safe_open(str(heads_file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = (
        {"tokenizer.model": hf_dir / "tokenizer.model"}
        if (hf_dir / "tokenizer.model").is_file()
        else None
    )
    save_model_dir(tmp, args, state, extra_files=extra)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path, help="WMTP model dir (hf) or HF directory (wmtp)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", choices=("hf", "wmtp"), default="hf")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast the weights (default: as stored)"
    )
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.model (default: beside CKPT)")
    a = parser.parse_args(argv)
    if a.format == "hf":
        path = export_hf(a.ckpt, a.out, DTYPES.get(a.dtype), a.tokenizer)
    else:
        path = import_wmtp(a.ckpt, a.out)
    print(f"[export] {a.format} → {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
