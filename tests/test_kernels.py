"""The fused soft-target losses against the naive [N, V] reference: values and gradients, Triton (in its
interpreter, fp32 on CPU) and the torch path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

CASE = """
import torch
from deepspec.kernels.soft_loss import reference_losses, soft_target_losses

def case(n, v, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 3
    idx = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    p = torch.softmax(torch.randn(n, k, generator=g) * 2, -1) * 0.9   # 90% of the mass in the top-k
    p[:, -3:] = 0.0                                                    # ids outside the draft vocabulary
    idx[:, -2:] = 0                                                    # their placeholder ids repeat
    w_ce, w_l1 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    return logits, idx, p, w_ce, w_l1

def compare(use_triton, n=37, v=3001, k=16, seed=0):
    logits, idx, p, w_ce, w_l1 = case(n, v, k, seed)
    ref_in = logits.clone().requires_grad_(True)
    ce_r, l1_r = reference_losses(ref_in, idx, p)
    ((ce_r * w_ce).sum() + (l1_r * w_l1).sum()).backward()
    fused_in = logits.clone().requires_grad_(True)
    ce_f, l1_f = soft_target_losses(fused_in * 1.0, idx, p, use_triton=use_triton)
    ((ce_f * w_ce).sum() + (l1_f * w_l1).sum()).backward()
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
    return {"ce": rel(ce_f.detach(), ce_r.detach()), "l1": rel(l1_f.detach(), l1_r.detach()),
            "grad": rel(fused_in.grad, ref_in.grad), "grad_norm": float(ref_in.grad.norm())}
"""


def _compare(use_triton: bool) -> dict[str, float]:
    scope: dict = {}
    exec(CASE, scope)
    return scope["compare"](use_triton)


def test_torch_path_matches_reference_values_and_gradients():
    out = _compare(False)
    assert out["grad_norm"] > 0.1  # both losses pull on the logits
    assert out["ce"] < 1e-5 and out["l1"] < 1e-5 and out["grad"] < 1e-5, out


def test_triton_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    script = CASE + "\nimport json\nprint(json.dumps(compare(True)))\n"
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before the kernels are defined
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ce"] < 1e-5 and out["l1"] < 1e-5 and out["grad"] < 1e-5, out


def test_backward_reuses_the_logits_storage():
    from deepspec.kernels import soft_target_losses

    logits = torch.randn(4, 50, requires_grad=True)
    z = logits * 2.0  # a non-leaf, as a drafter's head output is
    seen = {}
    z.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
    ce, l1 = soft_target_losses(z, torch.tensor([[1, 2]] * 4), torch.tensor([[0.5, 0.25]] * 4))
    (ce.sum() + l1.sum()).backward()
    assert seen["ptr"] == z.data_ptr()  # no [N, V] gradient buffer was allocated


def test_bad_shapes_are_refused_with_a_message():
    from deepspec.kernels import soft_target_losses

    with pytest.raises(ValueError, match=r"logits \[N, V\] and idx / p \[N, k\] expected"):
        soft_target_losses(torch.zeros(3, 10), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))


def test_bench_loss_from_the_cli_writes_its_table_and_an_mlflow_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from conftest import write_config
    from deepspec.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "results")
    assert main(["bench", "loss", "--config", str(cfg), "--rows", "16", "--vocab", "500"]) == 0
    table = (tmp_path / "results" / "t" / "bench" / "loss.md").read_text()
    assert "| naive " in table and "| fused " in table and "500" in table
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["deepspec.bench"] == "loss"
    assert run.data.params["vocab"] == "500"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "bench")} == {"bench/loss.md"}


@pytest.mark.parametrize("rows", [1, 6, 64])
def test_head_soft_ce_equals_the_naive_loss_and_gradients(rows):
    """The chunked head loss against log-softmax of the full logits (float64: equal to rounding), with
    placeholder ids outside the draft vocabulary (p = 0), whatever the chunk size."""
    from deepspec.kernels.head_loss import head_soft_ce

    g = torch.Generator().manual_seed(rows)
    n, h, v, k = 37, 8, 50, 5
    x = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(0, v, (n, k), generator=g)
    p = torch.softmax(torch.randn(n, k, dtype=torch.float64, generator=g), -1)
    p[:, -1], idx[:, -1] = 0.0, 0
    weight = torch.rand(n, dtype=torch.float64, generator=g)
    ce, top = head_soft_ce(x, w, idx, p, rows=rows)
    (ce * weight).sum().backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    logp = torch.log_softmax(x @ w.T, -1)
    ref = -(p * logp.gather(-1, idx)).sum(-1)
    (ref * weight).sum().backward()
    torch.testing.assert_close(ce, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(top, logp.argmax(-1))
    with pytest.raises(ValueError, match=r"head_soft_ce: x \[N, H\], weight \[V, H\]"):
        head_soft_ce(x, w[:, :3], idx, p)


def test_the_repository_root_does_not_shadow_the_kernels_distribution():
    """Python started in the repository root sees this folder first as a top-level `kernels`; transformers
    imports the `kernels` distribution (hub kernels) when it is installed, and must get that one."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        version("kernels")
    except PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", "import kernels, transformers.integrations.hub_kernels; "
                           "print(kernels.__file__)"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).resolve().parent != root / "kernels"
