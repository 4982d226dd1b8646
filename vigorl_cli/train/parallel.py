"""Single process, FSDP2 or DeepSpeed ZeRO behind one small interface. Training loops never import deepspeed.

::

    dist = setup("fsdp2")                      # init_process_group under torchrun (gloo on CPU, nccl on GPU)
    run = wrap(LogProbModel(hf), dist, opt)    # shard / engine-wrap, build AdamW
    logp = run.module(**batch.model_inputs())  # forward through the wrapped root
    run.backward(loss, sync=last_micro_batch)  # gradients are SUMMED over ranks (see below)
    grad_norm = run.step(lr)                   # clip, optimizer step, zero grads
    sd = run.full_state_dict()                 # rank 0: the HF model's full state dict; others: None
    run.save_state(dir); run.load_state(dir)   # resumable optimizer (+ sharded weights)
    teardown(dist)

Gradients: each rank passes the loss as *its share of a global sum* (e.g. its summed token NLL divided by the
token count of the whole optimizer step over all ranks). FSDP2 and DeepSpeed average gradients over ranks, so
``backward`` multiplies by the world size; the result is the gradient of the global mean whatever the number of
ranks, micro-batches or tokens per rank.

FSDP2 follows torchtune's order: LoRA → activation checkpointing → ``fully_shard`` on every decoder layer and every
vision block → ``fully_shard`` on the root (the :class:`~vigorl_cli.train.batching.LogProbModel`, so the root's
all-gather covers the embeddings and lm_head used by the chunked log-prob head). bf16 on GPU: autocast for a single
process, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` for FSDP2, DeepSpeed's ``bf16`` section for
ZeRO; the optimizer always holds fp32 master weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as tdist
from torch import nn

from vigorl_cli.errors import CheckpointError, RecipeError

Backend = Literal["single", "fsdp2", "deepspeed"]


@dataclass
class Dist:
    """Where this process runs. ``rank 0 of 1`` without torchrun."""

    backend: Backend
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this module created the process group (and destroys it in teardown)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (float64 on the wire)."""
        if not self.distributed or self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        tdist.all_reduce(t)
        return t.tolist()

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of a few numbers over ranks."""
        if not self.distributed or self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return t.tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed or self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed or self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")


def world_size_and_rank() -> tuple[int, int]:
    """``(world_size, rank)``; ``(1, 0)`` when no process group exists (torchtune's helper)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size(), tdist.get_rank()
    return 1, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(backend: Backend) -> Dist:
    """Start (or join) the process group the backend needs and pick this rank's device.

    Under torchrun the environment names rank and world size. ``fsdp2``/``deepspeed`` without torchrun run as a
    one-rank group (useful on one GPU). ``single`` under a multi-process torchrun is refused: every rank would train
    its own copy.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "single" and world > 1:
        raise RecipeError(f"running under torchrun with {world} processes but sft.parallel is 'single'",
                          hint="--set sft.parallel=fsdp2 (or deepspeed)")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    owns = False
    if backend != "single" and not tdist.is_initialized():
        pg = "nccl" if cuda else "gloo"
        if "MASTER_ADDR" not in os.environ:  # not under torchrun: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        if backend == "deepspeed":
            import deepspeed

            if not cuda:
                # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce with g++ on first use (30-90 s, needs a
                # compiler); gloo does the same job for the CPU runs (tests, smoke runs) this path serves.
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            deepspeed.init_distributed(dist_backend=pg)
        else:
            tdist.init_process_group(pg, device_id=device if cuda else None)
        owns = True
    return Dist(backend=backend, rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def teardown(dist: Dist) -> None:
    if dist.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()  # no barrier: after an error on one rank it would hang the others


# -------------------------------------------------------------------------------------------------------------------
# Wrapping
# -------------------------------------------------------------------------------------------------------------------

@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    bf16: bool = False  # bf16 compute (fp32 master weights)
    grad_accum: int = 1  # micro-batches per step (DeepSpeed's config needs it)
    micro_batch_size: int = 1
    deepspeed_config: str | dict | None = None  # path, "zero2", "zero3", a dict, or None (= zero3)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; biases and norm weights (1-D) get no weight decay, as in HF Trainer."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kw: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps}
    if device.type == "cuda":
        kw["fused"] = True
    return torch.optim.AdamW(groups, **kw)


def _strip(sd: dict[str, torch.Tensor], prefix: str = "hf.") -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in sd.items()}


def _clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, max_norm: float, lr: float) -> float:
    """Clip the gradient norm, set the learning rate, step, zero the grads; returns the norm before clipping.
    (Under FSDP2 the norm is a DTensor: its full value is the global norm.)"""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class Wrapped:
    """The interface a training loop sees. ``module`` is called for the forward; ``hf`` is the HF (or peft) model."""

    dist: Dist
    module: nn.Module
    hf: nn.Module

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        raise NotImplementedError

    def step(self, lr: float) -> float:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def save_state(self, path: Path) -> None:
        raise NotImplementedError

    def load_state(self, path: Path) -> None:
        raise NotImplementedError

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


class SingleProcess(Wrapped):
    """One process, one device; autocast for bf16."""

    def __init__(self, model: nn.Module, dist: Dist, cfg: OptimConfig):
        self.dist, self.cfg = dist, cfg
        self.module = model.to(dist.device)
        self.hf = model.hf
        self.optimizer = _adamw(param_groups(model, cfg.weight_decay), cfg, dist.device)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def autocast(self):
        if self.cfg.bf16:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        loss.backward()

    def step(self, lr: float) -> float:
        return _clip_and_step(self.params, self.optimizer, self.cfg.max_grad_norm, lr)

    def full_state_dict(self):
        return _strip(self.module.state_dict())

    def save_state(self, path: Path) -> None:
        trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"model": trainable, "optimizer": self.optimizer.state_dict()}, path / "state.pt")

    def load_state(self, path: Path) -> None:
        f = path / "state.pt"
        if not f.is_file():
            raise CheckpointError(f"{f} not found: this checkpoint was not written by a single-process run")
        blob = torch.load(f, map_location=self.dist.device, weights_only=True)
        res = self.module.load_state_dict(blob["model"], strict=False)
        if res.unexpected_keys or set(blob["model"]) != {n for n, p in self.module.named_parameters()
                                                          if p.requires_grad}:
            raise CheckpointError(f"{f} does not match the model's trainable parameters",
                                  hint="resume with the same recipe (model, lora) that wrote the checkpoint")
        self.optimizer.load_state_dict(blob["optimizer"])


class FSDP2(Wrapped):
    """``fully_shard`` per decoder layer and vision block, then the root; sharded (DCP) training state."""

    def __init__(self, model: nn.Module, dist: Dist, cfg: OptimConfig):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from vigorl_cli.train.batching import hf_parts

        self.dist, self.cfg = dist, cfg
        mesh = init_device_mesh(dist.device.type, (dist.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.bf16 else \
            MixedPrecisionPolicy()
        _, backbone, _ = hf_parts(model.hf)
        model.to(dist.device)
        for block in [*backbone.language_model.layers, *backbone.visual.blocks]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.module = model
        self.hf = model.hf
        self.optimizer = _adamw(param_groups(model, cfg.weight_decay), cfg, dist.device)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        (loss * self.dist.world_size).backward()  # FSDP2 averages gradients over ranks; we want the sum

    def step(self, lr: float) -> float:
        return _clip_and_step(self.params, self.optimizer, self.cfg.max_grad_norm, lr)

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _strip(sd) if self.dist.is_main else None

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(path / "dcp"))

    def load_state(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (path / "dcp" / ".metadata").is_file():
            raise CheckpointError(f"{path / 'dcp'} is not a distributed checkpoint of an FSDP2 run")
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def deepspeed_config(cfg: OptimConfig) -> dict:
    """The DeepSpeed config: a file, or the built-in ZeRO-2/3 one; batch, clipping and bf16 always come from us."""
    spec = cfg.deepspeed_config
    if isinstance(spec, dict):
        ds = dict(spec)
    elif spec in (None, "zero3", "zero2"):
        stage = 2 if spec == "zero2" else 3
        ds = {"zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}}
        if stage == 3:
            ds["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True)
    else:
        p = Path(str(spec))
        if not p.is_file():
            raise RecipeError(f"DeepSpeed config not found: {p}", hint="a JSON file, or 'zero2' / 'zero3'")
        try:
            ds = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RecipeError(f"{p}: not valid JSON: {e}") from None
    for k in ("optimizer", "scheduler"):
        ds.pop(k, None)  # ours: AdamW with the recipe's schedule
    ds.pop("train_batch_size", None)
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # full weights for save_pretrained
    for k, v in list(zero.items()):
        if v == "auto":  # HF-style configs: let DeepSpeed pick its defaults
            zero.pop(k)
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size, gradient_accumulation_steps=cfg.grad_accum,
              gradient_clipping=cfg.max_grad_norm, bf16={"enabled": cfg.bf16}, fp16={"enabled": False},
              steps_per_print=10 ** 9, wall_clock_breakdown=False)
    return ds


class DeepSpeed(Wrapped):
    """A DeepSpeed engine over the model with a client AdamW (no JIT-built cpu_adam on CPU)."""

    def __init__(self, model: nn.Module, dist: Dist, cfg: OptimConfig):
        import deepspeed

        # DeepSpeed's deprecated collective calls warn on every step under torch 2.13
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.dist, self.cfg = dist, cfg
        self.ds_config = deepspeed_config(cfg)
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        # not fused: the parameters are still on the CPU here, and ZeRO steps its own flat fp32 partitions anyway
        opt = _adamw(param_groups(model, cfg.weight_decay), cfg, torch.device("cpu"))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        self.module = self.engine
        self.hf = model.hf

    def backward(self, loss: torch.Tensor, sync: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(sync)
        self.engine.backward(loss * self.dist.world_size, scale_wrt_gas=False)  # DeepSpeed averages over ranks

    def step(self, lr: float) -> float:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.engine.step()  # reduce, clip, update, zero grads
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_state_dict(self):
        if self.stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # collective; rank 0 gets the tensors
        else:
            sd = self.engine.module.state_dict()
        return _strip({k: v.cpu() for k, v in sd.items()}) if self.dist.is_main and sd is not None else None

    def save_state(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state")

    def load_state(self, path: Path) -> None:
        if not (path / "deepspeed" / "state").is_dir():
            raise CheckpointError(f"{path / 'deepspeed'} is not a checkpoint of a DeepSpeed run")
        load_path, _ = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state",
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")


def wrap(model: nn.Module, dist: Dist, cfg: OptimConfig) -> Wrapped:
    """Wrap a :class:`~vigorl_cli.train.batching.LogProbModel` (LoRA and checkpointing already applied)."""
    if dist.backend == "fsdp2":
        return FSDP2(model, dist, cfg)
    if dist.backend == "deepspeed":
        return DeepSpeed(model, dist, cfg)
    return SingleProcess(model, dist, cfg)


def log_rank_zero(dist: Dist, log, *args) -> None:
    if dist.is_main:
        log(*args)
