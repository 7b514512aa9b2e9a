"""Checkpoints and exports mirrored to S3 (`s3.checkpoints: true` in the environment config).

    s3://{bucket}/{prefix}/runs/{run.name}/checkpoints/step_0000100/...   a complete checkpoint
    s3://{bucket}/{prefix}/runs/{run.name}/export/final/...               the safetensors export

Upload: once a checkpoint is complete on local disk, a background thread (rank 0) uploads its
files, each with its SHA256 in the object's metadata, and its SHA256SUMS manifest last: in S3 a
checkpoint without its manifest is incomplete and never used. Training does not wait; a failed
upload surfaces at the next step as a StorageError. Beyond `checkpoint.keep_last` (and `best`),
older checkpoints are deleted in S3 as on disk.
Resume: with no intact checkpoint on local disk, the newest S3 checkpoint with a manifest is
downloaded into a temporary directory, every file checked against the manifest, then renamed
into place; one that does not verify is skipped with a message.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.config import S3Config
from runtime.errors import StorageError
from runtime.integrity import SUMS_FILE, read_sha256sums, sha256_file, sha256sums_problems
from runtime.s3 import s3_client
from training.distributed import DistInfo, barrier

RETRIES = 3


@dataclass
class Upload:
    local: Path
    remote: str  # key under runs/{run}/, e.g. checkpoints/step_0000100
    keep: set[str] | None = None  # remote checkpoint names to keep after it (rotation)


class CheckpointMirror:
    def __init__(self, config: S3Config, run_name: str, log=print):
        self.bucket = config.bucket
        self.root = "/".join(p for p in (config.prefix.strip("/"), "runs", run_name) if p)
        self.client = s3_client(config)
        self.log = log
        self.jobs: queue.Queue[Upload | None] = queue.Queue()
        self.failure: StorageError | None = None
        self.thread = threading.Thread(target=self._work, name="wmtp-s3-mirror", daemon=True)
        self.thread.start()

    def uri(self, remote: str) -> str:
        return f"s3://{self.bucket}/{self.root}/{remote}"

    # ------------------------------------------------------------------ upload
    def upload(self, local: Path, remote: str, keep: set[str] | None = None) -> None:
        """Queues `local` (a complete directory) for upload to `remote`; returns at once."""
        self.jobs.put(Upload(local, remote, keep))

    def check(self) -> None:
        """Raises the StorageError of a failed upload (once)."""
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    def drain(self) -> None:
        """Waits for every queued upload (with a line every ~10 s), then raises any failure."""
        start, last = time.perf_counter(), 0.0
        while self.jobs.unfinished_tasks:
            time.sleep(0.2)
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                self.log(f"[s3] waiting for {self.jobs.unfinished_tasks} upload(s) to s3://{self.bucket}/{self.root} "
                         f"({last - start:.0f}s)")  # fmt: skip
        self.check()

    def close(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                for attempt in range(RETRIES):
                    try:
                        self._upload_dir(job)
                        break
                    except StorageError:
                        raise
                    except Exception as exc:  # boto3/network errors: retried, then reported
                        if attempt == RETRIES - 1:
                            cause = (
                                str(exc).strip().splitlines()[-1]
                                if str(exc).strip()
                                else type(exc).__name__
                            )
                            raise StorageError(
                                f"uploading {job.local} to {self.uri(job.remote)} failed: {cause}"
                            ) from None
                        time.sleep(2**attempt)
                if job.keep is not None:
                    self._rotate(job.keep)
            except StorageError as exc:
                self.failure = exc
            finally:
                self.jobs.task_done()
        self.jobs.task_done()

    def _upload_dir(self, job: Upload) -> None:
        files = sorted(p for p in job.local.rglob("*") if p.is_file() and p.name != SUMS_FILE)
        for path in [*files, job.local / SUMS_FILE]:  # the manifest last
            key = f"{self.root}/{job.remote}/{path.relative_to(job.local)}"
            self.client.upload_file(
                str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256_file(path)}}
            )
        self.log(f"[s3] {job.local.name} → {self.uri(job.remote)} ({len(files) + 1} files)")

    def _rotate(self, keep: set[str]) -> None:
        for name in self.remote_checkpoints(complete_only=False):
            if name not in keep:
                self._delete(f"checkpoints/{name}")

    def _delete(self, remote: str) -> None:
        keys = [o["Key"] for o in self._objects(f"{self.root}/{remote}/")]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )

    def _objects(self, prefix: str) -> list[dict]:
        found, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, **extra)
            found += page.get("Contents", [])
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    # ----------------------------------------------------------------- restore
    def remote_checkpoints(self, complete_only: bool = True) -> list[str]:
        """step_* names in S3, oldest first; with `complete_only`, those whose manifest is there."""
        names = {}
        for obj in self._objects(f"{self.root}/checkpoints/"):
            name, _, rest = obj["Key"].removeprefix(f"{self.root}/checkpoints/").partition("/")
            names[name] = names.get(name, False) or rest == SUMS_FILE
        return sorted(n for n, complete in names.items() if complete or not complete_only)

    def download(self, name: str, checkpoints_dir: Path) -> Path:
        """Downloads checkpoint `name`, verifies every file, renames it into `checkpoints_dir`."""
        final, tmp = checkpoints_dir / name, checkpoints_dir / f".{name}.download"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        prefix = f"{self.root}/checkpoints/{name}"
        self.client.download_file(self.bucket, f"{prefix}/{SUMS_FILE}", str(tmp / SUMS_FILE))
        for relative in read_sha256sums(tmp):
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, f"{prefix}/{relative}", str(tmp / relative))
        problems = sha256sums_problems(tmp)
        if problems:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"{self.uri('checkpoints/' + name)} does not verify: {problems[0]}")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final


def restore_from_mirror(
    mirror: CheckpointMirror | None, checkpoints_dir: Path, info: DistInfo, log=print
) -> None:
    """Rank 0 downloads the newest complete S3 checkpoint (when the local disk has none intact);
    every rank waits for it. Checkpoints that fail to download or verify are skipped."""
    if info.is_main and mirror is not None:
        for name in reversed(mirror.remote_checkpoints()):
            try:
                path = mirror.download(name, checkpoints_dir)
            except Exception as exc:  # noqa: BLE001 - a bad remote checkpoint is skipped, said why
                log(f"[resume] skipping {mirror.uri('checkpoints/' + name)}: {exc}")
                continue
            log(f"[resume] downloaded {mirror.uri('checkpoints/' + name)} → {path}")
            break
    barrier(info)
