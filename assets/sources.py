"""Fetching one remote file: local copy → S3 mirror → hub over HTTPS, resumable and verified.

Every file lands as `<dest>.part` first (resumed with an HTTP/S3 Range request if a previous
attempt was cut off), is SHA256-checked against the pinned digest (or pinned on first download
when none is configured), then renamed into place and hard-linked into a content-addressed
cache (`<cache>/cas/sha256/<digest>`), from which later fetches are served. A `.part.lock`
with the owner's pid marks a download in progress (cleanup never touches those).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.config import EnvConfig
from runtime.integrity import ChecksumError, sha256_file
from runtime.progress import Progress
from runtime.s3 import s3_client

CHUNK = 1 << 20


class FetchError(RuntimeError):
    """No source could provide the file; the message lists what each source said."""


@dataclass(frozen=True)
class RemoteFile:
    repo: str  # e.g. facebook/multi-token-prediction
    path: str  # path inside the repo, e.g. 7B_1T_4/params.json
    repo_type: str = "model"  # model | dataset
    sha256: str | None = None
    url: str | None = None  # a plain URL instead of the hub (e.g. MBPP on GitHub)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def s3_key(self, prefix: str) -> str:
        kind = "datasets" if self.repo_type == "dataset" else "models"
        return "/".join(p for p in (prefix.strip("/"), kind, self.repo, self.path) if p)

    def hub_url(self, base_url: str, revision: str) -> str:
        if self.url:
            return self.url
        kind = "datasets/" if self.repo_type == "dataset" else ""
        return f"{base_url.rstrip('/')}/{kind}{self.repo}/resolve/{revision}/{self.path}"


def transfer_progress(label: str, total: int | None, start: int = 0) -> Progress:
    """Bytes of one download: MiB done/total, MiB/s, ETA, a line every 10 s (live on a tty)."""
    return Progress(f"  {label}", total, "MiB", done=start, scale=2**20)


@contextlib.contextmanager
def download_lock(part: Path) -> Iterator[None]:
    lock = part.with_name(part.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def lock_is_active(lock: Path) -> bool:
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
    except (ValueError, OSError):
        return False
    return True


def _verify(path: Path, expected: str | None) -> str:
    digest = sha256_file(path)
    if expected and digest != expected:
        raise ChecksumError(f"SHA256 mismatch for {path.name}: expected {expected}, got {digest}")
    return digest


def _check_complete(part: Path, total: int | None) -> None:
    """A transfer cut short keeps its .part (resumed next time) and is an error now."""
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(
            f"transfer stopped at {size} of {total} bytes (kept {part.name} to resume)"
        )


def _copy_stream(read: Callable[[int], bytes], out, progress: Progress) -> None:
    while chunk := read(CHUNK):
        out.write(chunk)
        progress.update(len(chunk))


class Fetcher:
    def __init__(
        self, config: EnvConfig, cache_dir: Path, local_dirs: list[Path] | None = None, log=print
    ):
        self.config, self.cache_dir = config, cache_dir
        self.local_dirs = local_dirs or []
        self.log = log
        self._s3 = None

    # ------------------------------------------------------------- sources
    def _from_local(self, f: RemoteFile, part: Path) -> str:
        for root in self.local_dirs:
            for candidate in (root / f.path, root / f.repo / f.path, root / f.name):
                if candidate.is_file():
                    shutil.copyfile(candidate, part)
                    return f"local {candidate}"
        raise FileNotFoundError(f"not in local dirs {[str(d) for d in self.local_dirs]}")

    def _from_cache(self, f: RemoteFile, part: Path) -> str:
        if not f.sha256:
            raise FileNotFoundError("no pinned sha256 to look up")
        cached = self.cache_dir / "cas" / "sha256" / f.sha256
        if not cached.is_file():
            raise FileNotFoundError(f"not in cache {cached}")
        shutil.copyfile(cached, part)
        return f"cache {cached}"

    def s3_client(self):
        if self._s3 is None:
            self._s3 = s3_client(self.config.s3)
        return self._s3

    def _from_s3(self, f: RemoteFile, part: Path) -> str:
        s3 = self.config.s3
        if not s3.bucket:
            raise FileNotFoundError("no S3 mirror configured (s3.bucket)")
        client = self.s3_client()
        key = f.s3_key(s3.prefix)
        have = part.stat().st_size if part.exists() else 0
        head = client.head_object(Bucket=s3.bucket, Key=key)
        total = head["ContentLength"]
        if have < total:
            extra = {"Range": f"bytes={have}-"} if have else {}
            body = client.get_object(Bucket=s3.bucket, Key=key, **extra)["Body"]
            with open(part, "ab") as out:
                _copy_stream(body.read, out, transfer_progress(f"s3 {f.name}", total, have))
        _check_complete(part, total)
        return f"s3://{s3.bucket}/{key}" + (f" (resumed at {have} bytes)" if have else "")

    def _from_hub(self, f: RemoteFile, part: Path) -> str:
        url = f.hub_url(self.config.hub.base_url, self.config.hub.revision)
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url)
        token = os.environ.get("HF_TOKEN")
        if token and not f.url:
            request.add_header("Authorization", f"Bearer {token}")
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=60)  # noqa: S310 - configured https URL
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # already complete
                return f"{url} (already complete)"
            hint = (
                " (gated repo: set HF_TOKEN to a token that has accepted its license)"
                if exc.code in (401, 403)
                else ""
            )
            raise OSError(f"HTTP {exc.code} for {url}{hint}") from None
        with response:
            resumed = response.status == 206
            if have and not resumed:  # server ignored Range: start over
                part.unlink()
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length else None
            with open(part, "ab") as out:
                _copy_stream(response.read, out, transfer_progress(f"hub {f.name}", total, have))
        _check_complete(part, total)
        return url + (f" (resumed at {have} bytes)" if resumed else "")

    # --------------------------------------------------------------- fetch
    def fetch(self, f: RemoteFile, dest: Path) -> str:
        """Places `f` at `dest`, verified; returns its sha256. Idempotent."""
        if dest.is_file():
            return _verify(dest, f.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        errors = []
        with download_lock(part):
            for name, source in (
                ("local", self._from_local),
                ("cache", self._from_cache),
                ("s3", self._from_s3),
                ("hub", self._from_hub),
            ):
                try:
                    where = source(f, part)
                    digest = _verify(part, f.sha256)
                except ChecksumError as exc:
                    part.unlink(missing_ok=True)  # a corrupt copy is never resumed or kept
                    errors.append(f"{name}: {exc}")
                    continue
                except Exception as exc:  # noqa: BLE001 - each source's failure is reported below
                    errors.append(f"{name}: {exc}")
                    continue
                part.rename(dest)
                self._add_to_cache(dest, digest)
                self.log(f"  fetched {f.path} from {where} (sha256 {digest[:12]}…)")
                if self.config.s3.upload and name != "s3" and self.config.s3.bucket:
                    self.upload(f, dest)
                return digest
        raise FetchError(f"could not fetch {f.repo}/{f.path}:\n  " + "\n  ".join(errors))

    def _add_to_cache(self, path: Path, digest: str) -> None:
        cached = self.cache_dir / "cas" / "sha256" / digest
        if cached.exists():
            return
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, cached)
        except OSError:
            shutil.copyfile(path, cached)

    def upload(self, f: RemoteFile, path: Path) -> str:
        """Mirrors a file to S3 (skipped when the same size is already there)."""
        s3 = self.config.s3
        client = self.s3_client()
        key = f.s3_key(s3.prefix)
        with contextlib.suppress(Exception):
            if (
                client.head_object(Bucket=s3.bucket, Key=key)["ContentLength"]
                == path.stat().st_size
            ):
                return key
        client.upload_file(
            str(path), s3.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256_file(path)}}
        )
        self.log(f"  uploaded {path.name} to s3://{s3.bucket}/{key}")
        return key


def hub_list(
    config: EnvConfig, repo: str, path: str, repo_type: str = "dataset"
) -> list[RemoteFile]:
    """Files under `path` of a hub repo (the hub's tree API), with their LFS sha256 when given."""
    import json

    kind = "datasets" if repo_type == "dataset" else "models"
    url = f"{config.hub.base_url.rstrip('/')}/api/{kind}/{repo}/tree/{config.hub.revision}/{path}"
    request = urllib.request.Request(url)
    if os.environ.get("HF_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        entries = json.load(response)
    return [
        RemoteFile(repo, e["path"], repo_type, (e.get("lfs") or {}).get("oid"))
        for e in entries
        if e.get("type") == "file"
    ]
