"""The vision tower's forward as CUDA graphs, one per (image grid, image count), for prefills whose host time is what
the GPU waits for.

A Qwen2-VL / Qwen2.5-VL tower runs ~15 eager operations per block (32 blocks for the 3B) around small kernels: on an
H200 a multi-turn prefill's tower cost ~80 ms of host time (profiled) for ~28 ms of kernels (docs/performance.md,
issue 7), and the GPU waits for those launches. Zoom crops all come out of the processor at the same size (the
crop tool's fixed crop, resized to the pixel budget), so a prefill's crops repeat one grid; a graph per (grid, count)
replays them with one launch. Images of other grids (an episode's first image) form groups of their own; a group
runs eagerly until its key has been seen :attr:`TowerGraphs.AFTER` times (warming kernels and compiled regions),
then it is captured and replayed. Every group's index tables (``vision_precompute``) are computed on the host and
sent ahead, so neither path waits for the device. A new graph's first replay is checked against the eager tower on
the same inputs (one host sync per capture); a mismatch turns the graphs off with a warning.

Numerics: a group is the tower's forward over just those images (attention never crosses images: full-attention
blocks see one image, window blocks one window), so the features equal those of one call over all images, up to
the floating-point effects of a different batch. A replay's output buffer is overwritten by the next replay: the
features handed back are a copy (the engines keep them in their feature caches).
"""

from __future__ import annotations

from typing import Any

import torch

from vigorl_cli.engines.static_decode import GraphCache


class TowerGraphs(GraphCache):
    """Runs ``tower(pixels, grid, **tables)`` per group of images with the same grid; on a GPU each group key gets a
    CUDA graph once seen :attr:`AFTER` times (``use_graphs``). Counters: ``captures``, ``replays``, ``eager``."""

    AFTER = 1  # eager runs of a key before it is captured
    KEEP = 32  # graphs kept (least recently used dropped)
    WHAT = "vision graphs"

    def __init__(self, visual: torch.nn.Module):
        super().__init__(visual)  # graphs: key → (graph, static pixels, static output, tables)
        self.visual = visual
        self.eager = 0  # groups run eagerly

    def __call__(self, tower, pixels: torch.Tensor, grid_host: torch.Tensor, **kw: Any) -> Any:
        """The tower's output for images ``grid_host`` (a CPU ``[N, 3]`` grid; ``pixels`` their patches in order):
        ``pooler_output`` holds every image's merged features in image order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.stale():  # parameters moved: the graphs read stale addresses
            self.graphs.clear()
        rows = [tuple(int(x) for x in r) for r in grid_host.tolist()]
        starts = [0]
        for t, h, w in rows:
            starts.append(starts[-1] + t * h * w)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r, []).append(i)
        merge = int(getattr(self.visual, "spatial_merge_size", 2)) ** 2
        per_image: list[torch.Tensor | None] = [None] * len(rows)
        for grid, idx in groups.items():
            pix = pixels if len(groups) == 1 else torch.cat([pixels[starts[i]:starts[i + 1]] for i in idx])
            feats = self._group(tower, pix, grid, len(idx), kw)
            m = grid[0] * grid[1] * grid[2] // merge
            if len(groups) == 1:
                return BaseModelOutputWithPooling(pooler_output=feats)
            for j, i in enumerate(idx):
                per_image[i] = feats[j * m:(j + 1) * m]
        return BaseModelOutputWithPooling(pooler_output=torch.cat(per_image))

    def _group(self, tower, pix: torch.Tensor, grid: tuple, count: int, kw: dict) -> torch.Tensor:
        from vigorl_cli.models.load import to_device, vision_precompute

        key = (grid, count, pix.dtype, pix.shape[-1])
        got = self.graphs.get(key) if not kw else None  # (other keyword inputs: not what a graph was captured with)
        if got is not None:
            self.graphs.move_to_end(key)
            graph, static, out, _ = got
            static.copy_(pix)
            graph.replay()
            self.replays += 1
            return out.clone()
        dev = pix.device
        grid_cpu = torch.tensor([grid] * count, dtype=torch.long)
        tables = {k: to_device(v, dev) for k, v in vision_precompute(self.visual, grid_cpu).items()}
        grid_dev = to_device(grid_cpu, dev)
        self.seen[key] = self.seen.get(key, 0) + 1
        self.eager += 1
        ref = _pooled(tower(pix, grid_dev, **{**tables, **kw}))
        if self.use_graphs and self.capture_error is None and not kw and self.seen[key] > self.AFTER:
            static = pix.clone()
            graph, out = self._capture(tower, static, grid_dev, tables)
            if graph is not None:
                graph.replay()
                self._admit(key, (graph, static, out, (grid_dev, tables)), out, ref)  # (one host sync per capture)
        return ref

    def _capture(self, tower, static: torch.Tensor, grid: torch.Tensor, kw: dict) -> tuple[Any, Any]:
        """Record ``tower(static, grid, **kw)`` (not run): ``(graph, its output)``, or ``(None, None)`` after saying
        once why it could not be captured (the groups then run eagerly)."""
        return self._record(lambda: _pooled(tower(static, grid, **kw)))


def _pooled(out: Any) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out
