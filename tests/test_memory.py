"""Training memory bounded by design: the feature cache and its soft targets are read a sequence at a time."""

import json
import weakref

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import pipeline_config, tiny_llama


def test_row_files_round_trip_and_load_as_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from deepspec.features.rows import RowReader, RowWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"hidden": torch.randn(11, 3, 5, generator=g).bfloat16(), "ids": torch.arange(11, dtype=torch.int32),
               "mask": torch.rand(11, generator=g) > 0.5, "logp": torch.randn(11, 4, generator=g)}
    path = tmp_path / "rows.safetensors"
    with RowWriter(path, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, {"note": "x"}) as out:
        for name, v in tensors.items():
            for a, b in ((7, 11), (0, 3), (3, 7)):  # out of order: each write lands at its own rows
                out.write(name, a, v[a:b])
    assert not list(tmp_path.glob(".*tmp*"))
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"note": "x"})
    assert path.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()  # safetensors' own bytes
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = RowReader(path)
    assert reader.metadata == {"note": "x"} and reader.shape("hidden") == (11, 3, 5)
    assert torch.equal(reader.rows("hidden", 2, 9), tensors["hidden"][2:9])
    assert torch.equal(reader.rows("mask"), tensors["mask"]) and reader.rows("ids", 4, 4).shape == (0,)
    with pytest.raises(IndexError, match=r"rows \[5, 12\) of 'logp' out of range \(it has 11\)"):
        reader.rows("logp", 5, 12)
    with open(path, "r+b") as fh:  # a file cut short after its header was read
        fh.truncate(path.stat().st_size - 8)
    with pytest.raises(OSError, match=r"file ends before rows \[9, 11\) of 'mask' \(truncated\?\)"):
        reader.rows("mask", 9, 11)  # the last tensor of the file
    broken = tmp_path / "broken.safetensors"
    with pytest.raises(RuntimeError):
        with RowWriter(broken, {"ids": (torch.int32, (4,))}) as out:
            raise RuntimeError("killed")
    assert not broken.exists() and not list(tmp_path.glob(".broken*"))


def test_feature_store_and_soft_targets_read_what_was_written(tmp_path, tiny_target_dir):
    """Sequences read from the shards equal the shards' tensors; the stored soft targets equal the ones
    computed in memory, are reused, and a cache of replicated shards reuses them too."""
    from safetensors.torch import load_file

    from deepspec.data.regenerate import regenerate
    from deepspec.features.extract import FeatureStore, extract_all, load_manifest
    from deepspec.layout import features_dir
    from deepspec.models import load_model
    from deepspec.training.memory import replicate_cache
    from deepspec.training.targets import cached_soft_targets, soft_targets

    cfg = pipeline_config(tmp_path, tiny_target_dir)
    regenerate(cfg)
    extract_all(cfg)
    fdir = features_dir(cfg)
    manifest = load_manifest(fdir)
    store = FeatureStore(fdir, manifest, [3, 1, 4])  # 4 = n_layers: the final state
    assert len(store) == manifest["sequences"] == 8
    i = 0
    for s in manifest["shards"]:
        t = load_file(str(fdir / s["file"]))
        off = t["offsets"].tolist()
        for a, b in zip(off[:-1], off[1:]):
            seq = store.sequence(i)
            assert torch.equal(seq["input_ids"], t["input_ids"][a:b].long())
            assert torch.equal(seq["loss_mask"], t["loss_mask"][a:b].bool())
            assert torch.equal(seq["hidden"], t["hidden"][a:b][:, [2, 0, 3]])  # stored [1, 2, 3] + final
            assert torch.equal(store.final(i), t["hidden"][a:b, -1])
            i += 1
    head = load_model(str(tiny_target_dir)).model.get_output_embeddings().weight.detach().float()
    stored, reused = cached_soft_targets(fdir, manifest, store, head, 16)
    assert not reused and len(stored) == 8
    for i in range(8):
        want = soft_targets([{"final": store.final(i)}], head, 16)[0]
        assert all(torch.equal(stored[i][k], want[k]) for k in ("top_ids", "top_logp", "argmax"))
    files = sorted((fdir / "soft_targets").iterdir())
    assert len(files) == 2  # one per shard
    assert cached_soft_targets(fdir, manifest, store, head, 16)[1]
    big = tmp_path / "x3"
    grown = replicate_cache(fdir, big, 3)
    assert grown["sequences"] == 24 and len(grown["shards"]) == 6
    big_store = FeatureStore(big, load_manifest(big), [1])
    again, reused = cached_soft_targets(big, grown, big_store, head, 16)
    assert reused and sorted((fdir / "soft_targets").iterdir()) == files  # keyed by shard checksum
    assert torch.equal(big_store.sequence(19)["hidden"], store.sequence(19 % 8)["hidden"][:, 1:2])
    assert torch.equal(again[19]["top_logp"], stored[19 % 8]["top_logp"])


def test_training_memory_stays_flat_as_the_cache_grows(tmp_path, tiny_target_dir):
    """`bench memory` on a cache replicated 1024x (~280 MiB): the trainer's peak RSS grows by under 10%.
    Loading the cache whole, as training did before, would add those ~280 MiB (about +40% here)."""
    from deepspec.config import validate
    from deepspec.data.regenerate import regenerate
    from deepspec.features.extract import extract_all
    from deepspec.training.memory import bench_memory

    raw = pipeline_config(tmp_path, tiny_target_dir).model_dump(mode="json")
    raw["drafters"]["b"] = {"kind": "dflash", "layers": [0, 1, 2], "num_layers": 1, "block_size": 3, "num_anchors": 4,
                            "draft_vocab": 300, "fc_input_scale": True,
                            "train": {"batch_sequences": 2, "warmup_steps": 1, "val_sequences": 1}}
    raw["methods"]["b"] = {"kind": "block", "drafter": "b"}
    cfg = validate(raw)
    regenerate(cfg)
    extract_all(cfg)
    result = bench_memory(cfg, steps=2, scales=(1, 1024), drafters=["b"], ddp=False)
    rows = {r["scale"]: r for r in result["rows"]}
    assert rows[1024]["tokens"] == 1024 * rows[1]["tokens"] and rows[1024]["cache_gib"] > 0.25
    assert rows[1]["steps"] == rows[1024]["steps"] == 2  # the steps asked for, at every scale
    assert rows[1024]["peak_rss_mb"] < 1.10 * rows[1]["peak_rss_mb"], rows
    table = (cfg.out_dir / "bench" / "memory.md").read_text()
    assert "| b " in table and "yes" in table
    log = (cfg.out_dir / "bench" / "memory" / "memory_runs.jsonl").read_text().splitlines()
    assert [json.loads(line)["scale"] for line in log] == [1, 1024]


class LiveBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage made inside the mode and still alive, and their peak: the tensors' own
    memory, whatever the allocator or the machine keeps around them."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[tuple[int, int]] = set()

    def _free(self, key: tuple[int, int]) -> None:
        self.seen.discard(key)
        self.live -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key[1] and key not in self.seen:
                    self.seen.add(key)
                    self.live += key[1]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out


@pytest.mark.parametrize("chunked,steps,bounded", [(True, 7, True), (False, 2, False)])
def test_eagle3_step_at_a_152k_vocabulary_peaks_below_two_logits_tensors(chunked, steps, bounded):
    """One EAGLE-3 training step (forward and backward of 7 training-time-test steps, 1,024 positions,
    Qwen3's vocabulary, tiny hidden size) through the chunked head allocates at its peak less than twice one
    [T, V] bf16 logits tensor; the naive path exceeds that with 2 steps (the negative control)."""
    from deepspec.drafters.eagle3.model import Eagle3Drafter

    T, V = 1024, 151_936
    target = tiny_llama(vocab=V, layers=2, dtype=torch.float32, hidden=64)
    drafter = Eagle3Drafter.for_target(target, [0, 1], torch.arange(V))  # the whole vocabulary drafted
    g = torch.Generator().manual_seed(1)
    hidden, ids = torch.randn(T, 128, generator=g), torch.randint(0, V, (T,), generator=g)
    idx = torch.randint(0, V, (T, 64), generator=g)
    p = torch.softmax(torch.randn(T, 64, generator=g), -1)
    trained = torch.ones(T, dtype=torch.bool)
    with LiveBytes() as memory:
        losses, _, _ = drafter.ttt_loss(hidden, ids, idx, p, idx[:, 0], trained.float(), trained, steps,
                                        chunked_head=chunked)
        sum(losses).backward()
    logits_bf16 = T * V * 2
    assert (memory.peak < 2 * logits_bf16) == bounded, memory.peak / logits_bf16


def test_online_features_train_as_the_cache_does_and_the_dag_skips_extraction(tmp_path, tiny_target_dir):
    """`features.extract: online` runs the target inside the training job: with the cache's dtype and order it
    takes exactly the cached run's steps (every logged loss and the weights equal), writes no cache, and
    `snakemake -n` plans no extract job; `deepspec extract` refuses it by name."""
    import subprocess

    import yaml

    from deepspec import io
    from deepspec.config import validate
    from deepspec.data.regenerate import regenerate
    from deepspec.features.extract import FeatureCacheError, extract_all
    from deepspec.layout import drafter_dir, features_dir
    from deepspec.training.trainer import train

    cached = pipeline_config(tmp_path / "cached", tiny_target_dir)
    regenerate(cached)
    extract_all(cached)
    raw = cached.model_dump(mode="json")
    raw["results_dir"] = str(tmp_path / "online" / "results")
    raw["features"]["extract"] = "online"
    online = validate(raw)
    (tmp_path / "online" / "results" / "tiny" / "data" / "train").mkdir(parents=True)
    (tmp_path / "online" / "results" / "tiny" / "data" / "train" / "regenerated.jsonl").write_bytes(
        (tmp_path / "cached" / "results" / "tiny" / "data" / "train" / "regenerated.jsonl").read_bytes())
    logs = {}
    for cfg in (cached, online):
        out = train(cfg, "d")
        logs[cfg.features.extract] = ([{k: v for k, v in r.items() if k not in ("tokens_per_s", "wall_s", "peak_rss_mb")}
                                       for r in io.read_jsonl(out / "train_log.jsonl")],
                                      (out / "model" / "model.safetensors").read_bytes())
    assert logs["online"][0] == logs["cached"][0] and len(logs["online"][0]) == 9
    assert logs["online"][1] == logs["cached"][1]
    assert not features_dir(online).exists() and drafter_dir(online, "d").is_dir()
    with pytest.raises(FeatureCacheError, match="features.extract is online: training computes the target's states"):
        extract_all(online)
    config = tmp_path / "online.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run(["snakemake", "-n", "--configfile", str(config)], capture_output=True, text=True, timeout=300)
    plan = done.stdout + done.stderr
    assert done.returncode == 0, plan[-2000:]
    assert "train " in plan and "extract" not in plan.replace("deepspec extract", "")
