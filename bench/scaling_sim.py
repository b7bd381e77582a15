"""Prototype: activation-aware input-channel scaling before any4 (AWQ-style), simulated.

Each Linear's weight W [N, K] is quantized as Q(W diag(s)) and used as Q(W diag(s)) diag(1/s)
(dequantized, float32), with s_k = E[x_k^2]^(alpha/2) (normalised to geometric mean 1) and the
k-means sample weights E[x_k^2] / s_k^2 * scale^2 (the mse weighting of the scaled problem).
alpha = 0 is today's default. A real implementation folds diag(1/s) into the op before the
layer (RMSNorm weight, v_proj / up_proj rows), which is exact; this script only measures whether
it is worth building.

python bench/scaling_sim.py --dev --windows 4 --alphas 0,0.25,0.5 [--text FILE] --out PREFIX
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import any4
from any4.builtin import heldout_text, load_builtin
from any4.calibration import default_ids, read_text
from any4.eval import make_windows, perplexity, token_ids
from any4.metrics import Reference
from any4.stats import ChannelStats

sys.path.insert(0, os.path.dirname(__file__))
from accuracy_study import dev_index  # noqa: E402

STATS = []


def linears(model):
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }


def gather(model, ids, want_h):
    stats, cov, hooks = {}, {}, []
    for name, m in linears(model).items():
        stats[name] = ChannelStats()

        def hook(mod, inp, name=name):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            stats[name].update(x)
            if want_h:
                xd = x.double()
                cov[name] = cov.get(name, 0) + xd.T @ xd

        hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    return stats, cov


def refit_affine(qt, w, d, iters, do_lut=True):
    """Alternate closed-form weighted least squares on the diagonal objective
    sum_k d_k (lut[c_k] s_g + z_g - w_k)^2: (scale, zero) per group, then the table, then the
    codes (nearest), ``iters`` rounds; returns the float32 dequantized weight (bf16 rounding of
    table and affine, codes re-assigned after the rounding)."""
    N, K = qt.shape
    G = qt.group_size
    ng = -(-K // G)
    pad = ng * G - K
    codes = (
        torch.from_numpy(qt.codes().astype(np.int64))
        if not torch.is_tensor(qt.codes())
        else qt.codes().long()
    )
    lut = qt.lut.float().clone()
    sc = qt.scales.float()
    s, z = sc[..., 0].clone(), sc[..., 1].clone()
    W = torch.nn.functional.pad(w.float(), (0, pad)).reshape(N, ng, G)
    D = torch.nn.functional.pad(torch.as_tensor(d, dtype=torch.float32).expand(N, K), (0, pad))
    D = D.reshape(N, ng, G)
    c = torch.nn.functional.pad(codes, (0, pad)).reshape(N, ng, G)
    L = lut.shape[1]

    def obj(c, lut, s, z):
        v = torch.gather(lut, 1, c.reshape(N, -1)).reshape(N, ng, G)
        return float((D * (v * s[..., None] + z[..., None] - W) ** 2).sum())

    def assign(lut, s, z):
        vals = lut[:, None, None, :] * s[..., None, None] + z[..., None, None]  # N, ng, 1, L
        return (W[..., None] - vals).abs().argmin(-1)

    e0 = obj(c, lut, s, z)
    for _ in range(iters):
        v = torch.gather(lut, 1, c.reshape(N, -1)).reshape(N, ng, G)
        a11 = (D * v * v).sum(-1)
        a12 = (D * v).sum(-1)
        a22 = D.sum(-1)
        b1 = (D * v * W).sum(-1)
        b2 = (D * W).sum(-1)
        det = a11 * a22 - a12 * a12
        ok = det > 1e-12 * (a11 * a22 + 1e-30)
        ns = torch.where(ok, (b1 * a22 - b2 * a12) / torch.where(ok, det, 1), s)
        nz = torch.where(ok, (a11 * b2 - a12 * b1) / torch.where(ok, det, 1), z)
        s, z = ns, nz
        if do_lut:
            sk = s[..., None].expand_as(W)
            zk = z[..., None].expand_as(W)
            num = torch.zeros(N, L).scatter_add_(
                1, c.reshape(N, -1), (D * sk * (W - zk)).reshape(N, -1)
            )
            den = torch.zeros(N, L).scatter_add_(1, c.reshape(N, -1), (D * sk * sk).reshape(N, -1))
            lut = torch.where(den > 0, num / den.clamp_min(1e-30), lut)
        c = assign(lut, s, z)
    lut, s, z = (t.bfloat16().float() for t in (lut, s, z))
    c = assign(lut, s, z)
    e1 = obj(c, lut, s, z)
    v = torch.gather(lut, 1, c.reshape(N, -1)).reshape(N, ng, G)
    out = (v * s[..., None] + z[..., None]).reshape(N, -1)[:, :K]
    return out, e0, e1


def quantize_scaled(w, msq, alpha, fmt, G, clip, affine=0):
    s = np.power(np.maximum(msq, 1e-12), alpha / 2)
    s = s / np.exp(np.log(s).mean())
    if clip:
        s = np.clip(s, 1 / clip, clip)
    st = torch.from_numpy(s).float()
    sw = (msq / (s * s)).astype(np.float32)
    qt = any4.quantize(w * st, fmt, G, sample_weight=sw, scale_power=2, dtype="bfloat16")
    if affine:
        out, e0, e1 = refit_affine(qt, w * st, sw, affine)
        STATS.append(e1 / max(e0, 1e-30))
        return out / st
    return any4.dequantize(qt, "float32") / st


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--text")
    p.add_argument("--dev", action="store_true")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--alphas", default="0,0.25,0.5")
    p.add_argument("--fmt", default="any4")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--clip", type=float, default=0)
    p.add_argument("--affine", type=int, default=0, help="rounds of diagonal affine+table refit")
    p.add_argument("--search", action="store_true", help="per-layer alpha by output error (H)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    model, tok = load_builtin()
    text = read_text(a.text) if a.text else heldout_text()
    every = make_windows(token_ids(text, tok), 1024)
    idx = dev_index(every.shape[0], a.windows) if a.dev else list(range(a.windows))
    windows = every[idx].clone()
    ref = Reference()
    fp = perplexity(model, windows, progress=False, record=ref)
    print(f"fp {fp['ppl']:.4f}", flush=True)
    ids = default_ids(tok)
    stats, cov = gather(model, ids, a.search)
    orig = {n: m.weight.detach().clone() for n, m in linears(model).items()}
    rows = [{"config": "fp", "ppl": fp["ppl"]}]
    alphas = [float(x) for x in a.alphas.split(",")]
    configs = ["search"] if a.search else alphas
    for al in configs:
        t0 = time.perf_counter()
        chosen = {}
        for name, m in linears(model).items():
            w = orig[name]
            msq = stats[name].mean_sq
            if al == "search":
                H = (cov[name] / stats[name].count).float()
                best = None
                for cand in alphas:
                    d = quantize_scaled(w, msq, cand, a.fmt, a.group_size, a.clip, a.affine)
                    r = d - w
                    e = float(((r @ H) * r).sum())
                    if best is None or e < best[0]:
                        best = (e, cand, d)
                chosen[name] = best[1]
                d = best[2]
            else:
                d = quantize_scaled(w, msq, al, a.fmt, a.group_size, a.clip, a.affine)
            m.weight.data.copy_(d)
        qs = time.perf_counter() - t0
        if STATS:
            print(f"diag objective ratio after refit: mean {np.mean(STATS):.4f}", flush=True)
            STATS.clear()
        r = perplexity(model, windows, progress=False, reference=ref)
        row = {
            "config": f"alpha={al}",
            "affine": a.affine,
            "fmt": a.fmt,
            "G": a.group_size,
            "clip": a.clip,
            "ppl": r["ppl"],
            "kld": r["kld"],
            "top1": r["top1"],
            "quant_s": qs,
        }
        if chosen:
            row["chosen"] = chosen
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "chosen"}), flush=True)
        if chosen:
            print(np.unique(list(chosen.values()), return_counts=True), flush=True)
        with open(a.out + ".json", "w") as f:
            json.dump({"text": a.text or "pydoc", "windows": idx, "rows": rows}, f, indent=1)
    for name, m in linears(model).items():
        m.weight.data.copy_(orig[name])


if __name__ == "__main__":
    main()
