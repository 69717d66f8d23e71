"""`deepspec extract`: the target feature cache drafters train on (design §4).

Layout: `features/<target>/shard-NNNNN.safetensors` + `shard-NNNNN.json` (tokens, sha256) per shard,
and `manifest.json` over all shards. A shard holds, for its sequences concatenated:
  input_ids [N] int32, loss_mask [N] uint8, offsets [S+1] int64,
  hidden [N, K+1, H] (features.dtype): the K captured layers, then the final *normed* hidden state.
Layer ids follow HF's `hidden_states` indexing: id i is the hidden state entering decoder layer i
(0 = the embeddings). Target logits are not stored: they are `final @ lm_head.T`, turned once per
shard into top-k soft targets by the first training job (`soft_targets/`, `training/targets.py`). That is
(K+1)·H values per token (EAGLE-3, K=3: 4H) where DeepSpec stores 2·H·(L+1) bytes.

Each shard is written under a temp name, checksummed and renamed, so a killed run resumes at the next
missing shard and a corrupted one is detected (by `load_manifest`) instead of silently trained on.
Training reads the shards a sequence at a time (`FeatureStore`), never whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepspec import io, tracking
from deepspec.assets import sha256_file
from deepspec.config import Config
from deepspec.devices import job_device, on
from deepspec.drafters.registry import KINDS
from deepspec.features.rows import RowReader, RowWriter
from deepspec.layout import features_dir, shard_path, train_data_file

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYER_CONVENTION = "hf_hidden_states: id i = input of decoder layer i (0 = embeddings); 'final' = normed output of the last layer"


class FeatureCacheError(RuntimeError):
    pass


def drafter_layers(cfg: Config, name: str, n_layers: int) -> list[int]:
    """The HF hidden_states indices drafter `name` fuses (the cache's convention), as its kind reads them."""
    dc = cfg.drafters[name]
    try:
        return KINDS[dc.kind].feature_layers(dc, n_layers, f"drafters.{name}.layers")
    except ValueError as err:
        raise FeatureCacheError(str(err)) from None


def feature_layers(cfg: Config, n_layers: int) -> list[int]:
    """Every layer some drafter in use needs: one cache serves them all (the final state, id `n_layers`, is
    always stored)."""
    return sorted({i for d in cfg.drafters_in_use() for i in drafter_layers(cfg, d, n_layers) if i < n_layers})


def layer_columns(stored: list[int], wanted: list[int], n_layers: int) -> list[int]:
    """Columns of a [n, len(stored) + 1, H] feature block that hold the `wanted` ids: the stored layers in
    order, then the final normed state (id `n_layers`) in the last column."""
    return [len(stored) if i == n_layers else stored.index(i) for i in wanted]


def bytes_per_token(n_layers: int, hidden_size: int, dtype: str) -> int:
    """Feature-cache bytes per token: the stored layers and the final state, plus token id and loss mask."""
    return (n_layers + 1) * hidden_size * DTYPES[dtype].itemsize + 5


def shard_rows(rows: list[dict[str, Any]], shard: int, shards: int) -> list[dict[str, Any]]:
    return rows[shard::shards]  # strided: regenerated.jsonl is sorted by length, so shards stay balanced


def capture(backend, ids: list[int], layers: list[int]) -> torch.Tensor:
    """[n, K+1, H] hidden states of one sequence: the layers' inputs, then the final normed state."""
    from deepspec.models.lean import normed_final

    n_layers = backend.config.num_hidden_layers
    backend.cache.reset()
    _, caps = backend.forward(torch.tensor(ids), torch.arange(len(ids)), logits_rows=slice(0, 0),
                              capture_layers=(*layers, n_layers))
    caps[-1] = normed_final(backend, caps[-1])
    backend.cache.reset()
    return torch.stack(caps, dim=1)


def extract_shard(cfg: Config, shard: int, target=None) -> Path:
    """Write one shard (skipped when it is already there and matches its checksum)."""
    from deepspec.models import load_target

    if not 0 <= shard < cfg.features.shards:
        raise FeatureCacheError(f"shard {shard} out of range: features.shards is {cfg.features.shards}")
    path = shard_path(cfg, shard)
    meta_path = path.with_suffix(".json")
    if _shard_ok(path, meta_path, cfg):
        print(f"[extract] shard {shard}: present and verified, skipped")
        return path
    src = train_data_file(cfg)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: training data missing; run `deepspec prepare --train` first")
    rows = shard_rows(io.read_jsonl(src), shard, cfg.features.shards)
    max_len = cfg.features.max_len
    with tracking.stage_run(cfg, "extract", f"extract shard {shard}", shard=str(shard)) as run:
        device = torch.device("cpu")
        if target is None:
            device = job_device(cfg.resources.gpus)  # a GPU of this node no other extract job holds
            target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, max(cfg.target.max_len, max_len),
                                 device)
        backend = target.backend
        n_layers = backend.config.num_hidden_layers
        layers = feature_layers(cfg, n_layers)
        hidden_size = backend.config.hidden_size
        dtype = DTYPES[cfg.features.dtype]
        seqs = [(r["input_ids"][:max_len], r["loss_mask"][:max_len]) for r in rows]
        tokens = sum(len(s) for s, _ in seqs)
        per_token = bytes_per_token(len(layers), hidden_size, cfg.features.dtype)
        print(f"[extract] shard {shard}/{cfg.features.shards}: {len(seqs)} sequences, {tokens} tokens, layers {layers} + final; "
              f"about {tokens * per_token / 2**20:.1f} MiB ({per_token} bytes/token)")
        run.params({"shard": shard, "layers": layers, "dtype": cfg.features.dtype, "sequences": len(seqs),
                    "tokens": tokens, "estimated_bytes": tokens * per_token})
        torch.set_num_threads(cfg.eval.threads or os.cpu_count() or 1)
        specs = {"input_ids": (torch.int32, (tokens,)), "loss_mask": (torch.uint8, (tokens,)),
                 "offsets": (torch.int64, (len(seqs) + 1,)), "hidden": (dtype, (tokens, len(layers) + 1, hidden_size))}
        start, fwd = time.perf_counter(), 0.0
        # Written a sequence at a time: memory holds one sequence's states, whatever the shard's size.
        with RowWriter(path, specs, metadata={"layers": json.dumps(layers), "convention": LAYER_CONVENTION}) as out:
            out.write("input_ids", 0, torch.tensor([t for s, _ in seqs for t in s], dtype=torch.int32))
            out.write("loss_mask", 0, torch.tensor([m for _, ms in seqs for m in ms], dtype=torch.uint8))
            out.write("offsets", 0, torch.tensor([0] + [len(s) for s, _ in seqs], dtype=torch.int64).cumsum(0))
            pos = 0
            for ids, _ in tqdm(seqs, desc=f"extract {shard}", unit="seq", dynamic_ncols=True):
                t0 = time.perf_counter()
                with on(device):
                    feats = capture(backend, ids, layers).cpu()
                fwd += time.perf_counter() - t0
                if not torch.isfinite(feats).all():
                    raise FeatureCacheError(f"non-finite hidden states in a sequence of shard {shard}")
                out.write("hidden", pos, feats.to(dtype))
                pos += len(ids)
        elapsed = time.perf_counter() - start
        meta = {"shard": shard, "sequences": len(seqs), "tokens": tokens, "bytes": path.stat().st_size,
                "sha256": sha256_file(path), "layers": layers, "hidden_size": hidden_size, "dtype": cfg.features.dtype,
                "source_hash": _source_hash(cfg), "tokens_per_s": tokens / elapsed,
                "forward_tokens_per_s": tokens / fwd if fwd else None, "target_fingerprint": target.loaded.fingerprint,
                "tokenizer_hash": tokenizer_hash(target.tokenizer), "n_layers": n_layers}
        io.write_json(meta_path, meta)
        run.metrics({"tokens": tokens, "bytes": meta["bytes"], "tokens_per_s": tokens / elapsed,
                     "forward_share": fwd / elapsed})
        print(f"[extract] shard {shard}: {tokens} tokens in {elapsed:.1f}s ({tokens / elapsed:.0f} tok/s, "
              f"{100 * fwd / elapsed:.0f}% in the target forward), {meta['bytes'] / 2**20:.1f} MiB")
    return path


def _source_hash(cfg: Config) -> str:
    return cfg.section_hash("train_data") + cfg.section_hash("target") + cfg.section_hash("features")


def _shard_ok(path: Path, meta_path: Path, cfg: Config) -> bool:
    if not (path.is_file() and meta_path.is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    return meta.get("source_hash") == _source_hash(cfg) and meta.get("sha256") == sha256_file(path)


def tokenizer_hash(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def write_manifest(cfg: Config) -> Path:
    """manifest.json over all shards (its own MLflow run); every shard must be present and match its checksum."""
    with tracking.stage_run(cfg, "feature_manifest", "feature manifest") as run:
        out = _write_manifest(cfg)
        manifest = json.loads(out.read_text())
        run.tags(tracking.lineage({"train_data": train_data_file(cfg)},
                                  {"train_data": cfg.section_hash("train_data"), "features": cfg.section_hash("features"),
                                   "target": cfg.section_hash("target")}))
        run.params({"layers": manifest["layers"], "layer_convention": manifest["layer_convention"],
                    "dtype": manifest["dtype"], "shards": len(manifest["shards"]), "max_len": manifest["max_len"]})
        run.metrics({"tokens": manifest["tokens"], "sequences": manifest["sequences"],
                     "bytes": sum(s["bytes"] for s in manifest["shards"])})
        run.artifact(out)
    return out


def _write_manifest(cfg: Config) -> Path:
    metas = []
    for s in range(cfg.features.shards):
        path = shard_path(cfg, s)
        if not _shard_ok(path, path.with_suffix(".json"), cfg):
            raise FeatureCacheError(f"{path}: missing, stale or corrupted; run `deepspec extract --shard {s}`")
        metas.append(json.loads(path.with_suffix(".json").read_text()))
    first = metas[0]
    manifest = {
        "target": cfg.target.model, "target_fingerprint": first["target_fingerprint"],
        "tokenizer_hash": first["tokenizer_hash"], "layers": first["layers"], "layer_convention": LAYER_CONVENTION,
        "n_layers": first["n_layers"], "dtype": first["dtype"], "hidden_size": first["hidden_size"],
        "max_len": cfg.features.max_len, "tokens": sum(m["tokens"] for m in metas),
        "sequences": sum(m["sequences"] for m in metas), "source_hash": first["source_hash"],
        "shards": [{"file": shard_path(cfg, m["shard"]).name, "tokens": m["tokens"], "sequences": m["sequences"],
                    "sha256": m["sha256"], "bytes": m["bytes"]} for m in metas],
    }
    out = io.write_json(features_dir(cfg) / "manifest.json", manifest)
    print(f"[extract] manifest: {manifest['sequences']} sequences, {manifest['tokens']} tokens, "
          f"{sum(m['bytes'] for m in metas) / 2**20:.1f} MiB in {len(metas)} shards")
    return out


def load_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: feature cache missing; run `deepspec extract` first")
    manifest = json.loads(path.read_text())
    if verify:
        for s in manifest["shards"]:
            f = directory / s["file"]
            if not f.is_file():
                raise FeatureCacheError(f"{f}: shard missing")
            if sha256_file(f) != s["sha256"]:
                raise FeatureCacheError(f"{f}: checksum mismatch (corrupted); delete it and rerun `deepspec extract`")
    return manifest


class FeatureStore:
    """The cache's sequences, read one at a time from the shards (`rows.RowReader`), so that a training
    process holds its micro-batches and never the cache: memory does not grow with the cache's size.
    `hidden` holds the columns of the `layers` asked for (HF ids; id `n_layers` is the final state)."""

    def __init__(self, directory: Path, manifest: dict[str, Any], layers: list[int]):
        missing = [i for i in layers if i not in manifest["layers"] and i != manifest["n_layers"]]
        if missing:
            raise FeatureCacheError(f"feature cache {directory} lacks layers {missing} (has {manifest['layers']})")
        self.cols = layer_columns(manifest["layers"], layers, manifest["n_layers"])
        self.shards = [RowReader(Path(directory) / s["file"]) for s in manifest["shards"]]
        self.index: list[tuple[int, int, int]] = []  # (shard, first row, end row) per sequence
        for k, shard in enumerate(self.shards):
            off = shard.rows("offsets").tolist()
            self.index += [(k, a, b) for a, b in zip(off[:-1], off[1:])]

    def __len__(self) -> int:
        return len(self.index)

    def loss_mask(self, i: int) -> torch.Tensor:
        k, a, b = self.index[i]
        return self.shards[k].rows("loss_mask", a, b).bool()

    def final(self, i: int) -> torch.Tensor:
        """[n, H] final normed state of sequence `i`."""
        k, a, b = self.index[i]
        return self.shards[k].rows("hidden", a, b)[:, -1]

    def sequence(self, i: int) -> dict[str, torch.Tensor]:
        """{input_ids [n], loss_mask [n], hidden [n, len(layers), H]} of sequence `i`."""
        k, a, b = self.index[i]
        shard = self.shards[k]
        return {"input_ids": shard.rows("input_ids", a, b).long(), "loss_mask": shard.rows("loss_mask", a, b).bool(),
                "hidden": shard.rows("hidden", a, b)[:, self.cols]}


def extract_all(cfg: Config, shard: int | None = None) -> Path:
    """`deepspec extract`: one shard (a Snakemake job), or every missing shard then the manifest."""
    if not cfg.drafters_in_use():
        raise FeatureCacheError("no method decodes with a trained drafter: nothing to extract")
    if cfg.features.extract == "online":
        raise FeatureCacheError("features.extract is online: training computes the target's states itself, there "
                                "is no cache to extract")
    if shard is not None:
        return extract_shard(cfg, shard)
    from deepspec.models import load_target

    target = load_target(cfg.target.model, cfg.target.dtype, cfg.target.backend, max(cfg.target.max_len, cfg.features.max_len))
    for s in range(cfg.features.shards):
        extract_shard(cfg, s, target)
    return write_manifest(cfg)
