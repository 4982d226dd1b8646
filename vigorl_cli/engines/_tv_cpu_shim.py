"""Let the PyPI torchvision wheel (a CUDA build) import on a CPU-only torch (environment.md §2.1, workaround B).

Why: vLLM's Qwen-VL code (and transformers' Qwen-VL image/video processors) import torchvision. The only
torchvision wheels on PyPI are CUDA builds; against ``torch+cpu`` their C++ extension does not load, and
``import torchvision`` then dies in ``torchvision/_meta_registrations.py`` because the ``torchvision::nms`` and
``torchvision::qnms`` operator schemas were never registered. Everything the pipeline needs from torchvision is
pure Python (``transforms.v2``, PIL I/O), so registering the two schemas, and nothing else, is enough. The C++ ops
(``nms``, ``roi_align``, ...) stay unavailable and raise if called.

How: a ``sys.meta_path`` finder that waits for the first ``import torchvision``, registers the schemas (only when
``torch.version.cuda is None`` and the ops are missing, i.e. never on a CUDA install), removes itself and lets the
normal import proceed. It costs nothing until torchvision is imported and never raises.

Installation (``scripts/setup_vllm_cpu_env.sh`` does it): copy this file to ``site-packages/tv_cpu_shim.py`` and
write ``site-packages/tv_cpu_shim.pth`` containing the single line ``import tv_cpu_shim``, so that every
interpreter of that environment (including vLLM's worker processes) installs the hook at start-up.
"""

from __future__ import annotations

import importlib.abc
import sys

_LIBS: list = []  # keep the torch.library fragments alive (dropping them would unregister the schemas)
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def register_schemas() -> bool:
    """Define the missing ``torchvision::`` op schemas on a CPU-only torch. True when it defined them."""
    try:
        import torch

        if torch.version.cuda is not None or hasattr(torch.ops.torchvision, "nms"):
            return False
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            lib.define(schema)
        _LIBS.append(lib)
        return True
    except Exception:  # noqa: BLE001 - a start-up hook must never break the interpreter
        return False


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Fires once, on the first ``import torchvision``; never finds anything itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            uninstall()
            register_schemas()
        # returns None: never found here, the regular finders import torchvision


def install() -> None:
    """Add the hook (idempotent). If torchvision is already imported it is too late and nothing happens."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _BeforeTorchvision)]


install()
