"""Dynamic scene claiming for Stage I over many scenes: processes take scenes one at a time instead of a
fixed share, so that scenes balance over the GPUs and a dead process's scenes are taken over.

Claims are files in `<out>/.claims/`, one per scene, shared by every process of every machine (the output
folder must be on a file system they all see, as it already must for the results):

* `<key>.claim`: created with `O_CREAT | O_EXCL`, which exactly one process wins. It names its owner. While
  the owner works on the scene a heartbeat thread touches the file every `lease / 4` seconds; a claim whose
  file is older than the lease belongs to a dead (or hung) process.
* A stale claim is taken over by renaming it away (`os.rename` succeeds for one process only) and claiming
  the scene afresh; the new owner resumes from the scene's last checkpoint (`lift_scene` does that).
* `<key>.done`: written atomically when the scene is finished; it names who finished it.

A process keeps polling until every scene is done, so that it can take over scenes whose owner dies late.
The claim key is the scene folder's name (the results of two scenes with the same name would collide in
`<out>/` anyway).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .utils import atomic_write_text

__all__ = ["CLAIMS_DIRNAME", "SceneClaims"]

logger = logging.getLogger(__name__)

CLAIMS_DIRNAME = ".claims"


@dataclass
class _Held:
    key: str
    path: Path
    stop: threading.Event
    thread: threading.Thread


class SceneClaims:
    """Claims scenes of one output folder for this process.

    Args:
        out: the Stage I output folder (claims go to `<out>/.claims/`).
        lease_seconds: a claim not refreshed for this long is taken over. Keep it well above the longest
            pause a live process can have between heartbeats (a heartbeat thread refreshes it every
            `lease_seconds / 4`, also while the GPU is busy).
        poll_seconds: how often a process with nothing to claim looks again for finished or stale scenes.
        owner: this process's name in the claim files (default: host, pid and a random suffix).
    """

    def __init__(
        self,
        out: str | os.PathLike,
        lease_seconds: float = 600.0,
        poll_seconds: float | None = None,
        owner: str | None = None,
    ):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")
        self.folder = Path(out) / CLAIMS_DIRNAME
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = float(lease_seconds)
        self.poll_seconds = (
            float(poll_seconds) if poll_seconds is not None else min(30.0, self.lease_seconds / 4)
        )
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @staticmethod
    def key(scene_path: str | os.PathLike) -> str:
        return Path(scene_path).resolve().name

    def _claim_path(self, key: str) -> Path:
        return self.folder / f"{key}.claim"

    def _done_path(self, key: str) -> Path:
        return self.folder / f"{key}.done"

    def is_done(self, key: str) -> bool:
        return self._done_path(key).is_file()

    def _try_create(self, key: str) -> bool:
        """Creates the claim file, or returns False when another process holds it."""
        try:
            descriptor = os.open(self._claim_path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            json.dump(
                {
                    "owner": self.owner,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "claimed_at": time.time(),
                },
                handle,
            )
        return True

    def _is_stale(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime > self.lease_seconds
        except FileNotFoundError:
            return False

    def try_claim(self, key: str) -> bool:
        """Claims a scene that is neither done nor held by a live process; True when this process got it."""
        if self.is_done(key):
            return False
        if self._try_create(key):
            return not self._finished_meanwhile(key)
        path = self._claim_path(key)
        if not self._is_stale(path):
            return False
        # Take the stale claim over: only one process's rename succeeds; the others see it gone.
        stale = self.folder / f"{key}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(path, stale)
        except FileNotFoundError:
            return False
        previous = _read_owner(stale)
        stale.unlink(missing_ok=True)
        if not self._try_create(key):
            return False
        logger.warning(
            "%s: the claim of %s expired (no heartbeat for %.0f s): taking the scene over",
            key,
            previous,
            self.lease_seconds,
        )
        return not self._finished_meanwhile(key)

    def _finished_meanwhile(self, key: str) -> bool:
        # The previous owner may have written `.done` between our check and our claim.
        if self.is_done(key):
            self._claim_path(key).unlink(missing_ok=True)
            return True
        return False

    @contextlib.contextmanager
    def _heartbeat(self, key: str) -> Iterator[None]:
        path, stop = self._claim_path(key), threading.Event()

        def beat():
            while not stop.wait(self.lease_seconds / 4):
                try:
                    os.utime(path)
                except FileNotFoundError:
                    logger.warning("%s: this process's claim was taken over (a heartbeat came too late)", key)
                    return

        thread = threading.Thread(target=beat, name=f"claim-heartbeat-{key}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def mark_done(self, key: str) -> None:
        if self.is_done(key):  # another owner finished it too (it took over a claim whose owner still lived)
            logger.warning("%s was already finished by %s", key, _read_owner(self._done_path(key)))
        else:
            atomic_write_text(
                self._done_path(key), json.dumps({"owner": self.owner, "finished_at": time.time()})
            )
        self._claim_path(key).unlink(missing_ok=True)

    def release(self, key: str) -> None:
        """Gives a claim back unfinished (e.g. the scene failed), so that no one waits for its lease."""
        self._claim_path(key).unlink(missing_ok=True)

    def scenes(self, scene_paths: list) -> Iterator:
        """Yields the scenes this process gets, each while it holds the claim (kept alive by a heartbeat);
        returns once every scene is done. The caller lifts each yielded scene; a scene whose body raises is
        released, and the error propagates."""
        pending = {self.key(path): path for path in scene_paths}
        if len(pending) != len(scene_paths):
            raise ValueError(
                "scene folders must have distinct names: their results and claims are keyed by name"
            )
        while pending:
            claimed_any = False
            for key in list(pending):
                if self.is_done(key):
                    del pending[key]
                    continue
                if not self.try_claim(key):
                    continue
                claimed_any = True
                try:
                    with self._heartbeat(key):
                        yield pending[key]
                except BaseException:
                    self.release(key)
                    raise
                self.mark_done(key)
                del pending[key]
            if pending and not claimed_any:
                time.sleep(self.poll_seconds)  # the rest are held by live processes: look again later


def _read_owner(path: Path) -> str:
    try:
        return json.loads(path.read_text()).get("owner", "?")
    except (OSError, ValueError, AttributeError):
        return "?"
