"""Fused kernels (Triton, each with a torch path of the same semantics); installed as `deepspec.kernels`.

Python started in the repository root (`python -m pytest`, say) finds this folder first as a top-level
`kernels` package, which would shadow the `kernels` distribution (Hugging Face's hub kernels) that
transformers imports. Imported under that name, the folder hands it over to the installed distribution.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
else:
    from deepspec.kernels.soft_loss import reference_losses, soft_target_losses, triton_usable

    __all__ = ["reference_losses", "soft_target_losses", "triton_usable"]
