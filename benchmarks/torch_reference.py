r"""PyTorch/timm reference benchmark: one full training step of the published model.

Times the reference implementation (hibana2077/Feature-Map-Constraints-Enhance-Learning,
`models.py` concat fusion) for comparison with `python -m featdiv_jax.bench`: it accepts that
command's flags and writes its JSON fields (`impl: "torch"`, plus a few torch-only ones).

Model: K timm heads `create_model(arch, pretrained=False, num_classes=0)` whose `forward_features`
maps are stacked on a new head axis, flattened and fed to Linear(flat->512), GELU, Dropout(0.5),
Linear(512->classes). `--heads 1` is plain `create_model(arch, num_classes=classes)` (the
single-head baseline, no penalty). Loss = cross-entropy + 1.0 * mean over head pairs of
`F.cosine_similarity(f_i, f_j, dim=1).mean()`. Step = zero_grad, forward, loss, backward,
AdamW(lr=4e-4, weight_decay=5e-4) step, train mode, fixed synthetic data (NCHW float32).
`--dtype bfloat16` (alias `--amp`) is bfloat16 autocast with float32 parameters and no GradScaler,
on cpu and cuda: what the JAX benchmark's `--dtype bfloat16` means. `--stem cifar` swaps timm's
stem for a 3x3/1 conv without max-pool; `seresnet_tiny` is the project's tiny test network.
`--heads-impl`/`--conv-impl` are accepted and ignored, so the JAX command line runs unchanged.

torch and timm are NOT project dependencies; install them in a separate environment:
  pip install torch torchvision timm
Run:
  python benchmarks/torch_reference.py --arch seresnet18 --heads 2 --image-size 32 --batch 64 \
      --steps 10 [--warmup 3] [--dtype float32|bfloat16] [--amp] [--no-penalty] [--classes 10] \
      [--device cpu|cuda] [--json PATH] [--threads N] [--stem imagenet|cifar] \
      [--memory-format channels_last|contiguous]
"""
import argparse
import json
import os
import resource
import statistics
import time

import timm
import torch
from torch import nn
import torch.nn.functional as F


def backbone(arch, num_classes, stem):
  """A timm SE-ResNet (`num_classes=0`: no classifier), optionally with the CIFAR stem."""
  if arch == "seresnet_tiny":
    m = timm.models.resnet.ResNet(
        timm.models.resnet.BasicBlock, (1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8,
        num_classes=num_classes, block_args=dict(attn_layer="se"))
  else:
    m = timm.create_model(arch, pretrained=False, num_classes=num_classes)
  if stem == "cifar":
    m.conv1, m.maxpool = nn.Conv2d(3, m.conv1.out_channels, 3, 1, 1, bias=False), nn.Identity()
  return m


class MultiHead(nn.Module):
  """K timm heads -> stacked feature maps -> flatten -> MLP classifier (reference concat)."""

  def __init__(self, arch, heads, classes, image_size, stem):
    super().__init__()
    self.heads = nn.ModuleList(backbone(arch, 0, stem) for _ in range(heads))
    with torch.no_grad():  # flattened size from a probe forward (eval mode: no BN update)
      h = self.heads[0].eval()
      flat = heads * h.forward_features(torch.zeros(1, 3, image_size, image_size)).numel()
      h.train()
    self.classifier = nn.Sequential(
        nn.Linear(flat, 512), nn.GELU(), nn.Dropout(0.5), nn.Linear(512, classes))

  def forward(self, x):
    maps = [h.forward_features(x) for h in self.heads]  # each (B, C, H, W)
    return self.classifier(torch.stack(maps, dim=1).flatten(1)), maps


def cosine_penalty(maps):
  """Mean over head pairs of the channel-wise cosine similarity, averaged over B, H, W."""
  pairs = [F.cosine_similarity(maps[i], maps[j], dim=1).mean()
           for i in range(len(maps)) for j in range(i + 1, len(maps))]
  return torch.stack(pairs).mean()


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="seresnet18")
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--amp", action="store_true", help="same as --dtype bfloat16 (bf16 autocast)")
  p.add_argument("--no-penalty", action="store_true")
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--device", choices=["cpu", "cuda"],
                 default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--json", help="write the result as JSON here")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
  p.add_argument("--heads-impl", choices=["vmap", "loop"], help="ignored: torch loops over heads")
  p.add_argument("--conv-impl", choices=["auto", "xla", "im2col", "unrolled"], help="ignored")
  p.add_argument("--memory-format", choices=["channels_last", "contiguous"],
                 default="channels_last", help="of weights and input; channels_last measured "
                 "faster on cuda and on the 2-core cpu")
  a = p.parse_args()
  if a.heads < 1 or a.batch < 1 or a.steps < 1 or a.image_size < 8:
    p.error("--heads, --batch and --steps must be >= 1 and --image-size >= 8")
  amp, penalty = a.amp or a.dtype == "bfloat16", a.heads > 1 and not a.no_penalty
  mf = torch.channels_last if a.memory_format == "channels_last" else torch.contiguous_format
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

  model = (backbone(a.arch, a.classes, a.stem) if a.heads == 1 else
           MultiHead(a.arch, a.heads, a.classes, a.image_size, a.stem))
  model = model.to(a.device, memory_format=mf).train()
  num_params = sum(t.numel() for t in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=5e-4)
  x = torch.randn(a.batch, 3, a.image_size, a.image_size).to(a.device, memory_format=mf)
  y = torch.randint(0, a.classes, (a.batch,)).to(a.device)
  sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(a.device, dtype=torch.bfloat16, enabled=amp):
      logits, maps = model(x) if a.heads > 1 else (model(x), None)
      loss = F.cross_entropy(logits.float(), y)
      if penalty:
        loss = loss + 1.0 * cosine_penalty(maps)
    loss.backward()
    opt.step()
    return loss.detach()

  for _ in range(a.warmup):  # oneDNN/cuDNN choose kernels, the allocator fills up
    step()
  sync()
  load, times = os.getloadavg()[0], []  # other processes skew CPU timings: record the load
  for _ in range(a.steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append((time.perf_counter() - t0) * 1e3)

  med = statistics.median(times)
  q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
  peak = (torch.cuda.max_memory_allocated() if a.device == "cuda"  # cpu: growth of peak RSS
          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
  r = dict(
      impl="torch", arch=a.arch, heads=a.heads, image_size=a.image_size, batch=a.batch,
      classes=a.classes, dtype="amp_bf16" if amp else "float32", penalty=penalty, stem=a.stem,
      heads_impl="loop", memory_format=a.memory_format, steps=a.steps, warmup=a.warmup,
      compile_s=None, step_ms_median=med, step_ms_min=min(times), step_ms_max=max(times),
      step_ms_p10=q[0], step_ms_p90=q[-1], step_ms_std=statistics.pstdev(times),
      img_per_s=a.batch / med * 1e3, peak_mem_bytes=peak, num_params=num_params,
      loss=float(loss), device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
      threads=torch.get_num_threads(), loadavg_1m=load, torch_version=torch.__version__,
      timm_version=timm.__version__, step_ms_all=times)
  print(f"torch {a.arch} K={a.heads} {r['dtype']} {a.image_size}px b{a.batch} "
        f"penalty={'on' if penalty else 'off'} {a.memory_format}: step {med:.1f} ms (min "
        f"{r['step_ms_min']:.1f}, p10 {q[0]:.1f}, p90 {q[-1]:.1f}, max {r['step_ms_max']:.1f}), "
        f"{r['img_per_s']:.0f} img/s, peak mem {peak / 2**20:.0f} MiB, {num_params:,} params "
        f"({r['device']}, {r['threads']} threads)", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  main()
