"""PyTorch with FP16 autocast, channels_last, torch.compile and CUDA graphs: the GPU path without TensorRT.

Autocast rather than a half model: convolutions and attention run in FP16 while GroupNorm, which
sees the VAE's large activations, stays in FP32 (autocast's own list), so no layer needs hand
marking. ``reduce-overhead`` compiles with CUDA graphs, one per batch size, which replays the
network as one launch instead of one per kernel (what that saves at batch 1 is for ``gms-deploy
bench`` to show on a GPU). On a CPU the same class compiles in FP32, which is how CI proves it
without a GPU.

Compiling takes a minute or more per batch size (a smaller batch reuses a larger one's graph);
torch keeps what it compiled in a cache under ``/tmp``, which many systems empty at every boot, so
a cart would pay that minute on each start. Unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise,
the cache lives under the user's cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gms_deploy.backends.torch_eager import Stage, TorchRunner
from gms_deploy.bundle import ModelBundle


class TorchCompiledRunner(TorchRunner):
    name = "torch-compiled"

    def __init__(
        self, bundle: ModelBundle, device: str = "cuda", precision: str | None = None, mode: str | None = None
    ) -> None:
        persistent_compile_cache()
        self.mode = mode or ("reduce-overhead" if device.startswith("cuda") else "default")
        self.kind = f"compiled ({self.mode}) channels_last"
        super().__init__(bundle, device, precision)

    def default_precision(self) -> str:
        return "fp16" if self.device.type == "cuda" else "fp32"

    def _place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device).to(memory_format=torch.channels_last)

    def _wrap(self, fn: Stage) -> Stage:
        """Static shapes: one graph (and one CUDA graph) per batch size, never a dynamic-shape kernel.

        A batch smaller than one already compiled (a run's last, or one the out-of-memory fallback
        halved) is padded with zeros to the smallest such size instead of costing a compile of its
        own, a minute or more: no sample sees another in this network, so padding changes nothing.
        """
        run = super()._wrap(torch.compile(fn, mode=self.mode, dynamic=False))
        compiled: set[int] = set()

        def step(x: torch.Tensor) -> torch.Tensor:
            n = len(x)
            size = min((b for b in compiled if b >= n), default=n)
            if size > n:
                x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
            if self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            # A CUDA graph's output is overwritten by its next replay: the caller gets a copy.
            out = run(x.contiguous(memory_format=torch.channels_last))[:n].clone()
            compiled.add(size)
            return out

        return step


def persistent_compile_cache() -> None:
    """Point torch's compile cache at ``$XDG_CACHE_HOME/gms-deploy/torchinductor`` unless one is set.

    Importing ``torch._dynamo`` sets the variable to torch's default, so that value counts as unset.
    Where there is no home or that folder cannot be made, torch's own default stays.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and Path(chosen).resolve() != Path(default_cache_dir()).resolve():
        return
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        folder = base / "gms-deploy" / "torchinductor"
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # RuntimeError: no home directory to be found
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
