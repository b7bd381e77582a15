"""Streaming quantization at scale (SPEC §11): Llama-3-8B / 70B-shaped random bf16 checkpoints.

    python bench/quantize_scale.py --layers 32                  # the full 8B shape (~16 GB written)
    python bench/quantize_scale.py --layers 4 --procs 1,2 --block70b
    python bench/quantize_scale.py --workdir W --write-only     # write the checkpoints only
    python bench/quantize_scale.py --workdir W --keep ...       # reuse them (timed run)

Writes a sharded safetensors checkpoint with random bf16 weights (the real config: hidden 4096,
intermediate 14336, 32/8 heads, vocab 128256; ``--layers`` shrinks it), quantizes it with the
defaults (any4, G=128, exact k-means, one-pass, mse weighting) through ``any4 quantize --stream``
with 1 and 2 processes (torchrun), and records wall time split into load / calibration /
k-means / write and peak RSS (the maximum over ranks; each run in its own process). With
``--block70b`` it also times one Llama-3-70B-shaped block (hidden 8192, intermediate 28672,
64/8 heads, the real vocab) and projects it to 80 blocks. With ``--workdir`` the checkpoints
get fixed names there and are reused when present (write them beforehand with
``--write-only``, so that a timed run does not include writing 16 GB). Results go to
``bench/results/quantize_scale{tag}.{json,md}`` with the machine (CPU, ISA, LLC) and the load
average; the checkpoints are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_random_checkpoint(
    directory: str, shape: dict, layers: int, seed: int = 0, shard_bytes: int = 2 * 2**30
) -> int:
    """Write a LlamaForCausalLM checkpoint with random bf16 weights (std 0.02, norms 1) as
    HF-sharded safetensors + index + config.json + the built-in tokenizer when available;
    one tensor in memory at a time. Returns the bytes of tensors written."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from any4.checkpoint import _parameters_on_meta

    config = LlamaConfig(**{**shape, "num_hidden_layers": layers}, max_position_embeddings=8192,
                         tie_word_embeddings=False, rope_theta=500000.0, dtype="bfloat16")  # fmt: skip
    from transformers import LlamaForCausalLM

    with _parameters_on_meta():
        skeleton = LlamaForCausalLM(config)
    os.makedirs(directory, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shards: list = [[]]
    size = 0
    for key, p in skeleton.state_dict().items():
        nbytes = p.numel() * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, tuple(p.shape)))
        size += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shp in keys:
            if len(shp) == 1:
                t = torch.ones(shp, dtype=torch.bfloat16)
            else:  # in row chunks: no float32 copy of a 128256 x 8192 embedding
                t = torch.empty(shp, dtype=torch.bfloat16)
                step = max(1, (64 << 20) // (4 * shp[1]))
                for r in range(0, shp[0], step):
                    t[r : r + step] = torch.randn(
                        (min(step, shp[0] - r), shp[1]), generator=g
                    ).mul_(0.02)
            tensors[key] = t
            weight_map[key] = name
            total += t.numel() * 2
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config.save_pretrained(directory)
    return total


def calibration_ids_file(path: str) -> str:
    """The default calibration (3 rows of 400 tokens) as token ids of the built-in SmolLM2
    tokenizer when it loads (else UTF-8 bytes), a JSON list of rows written to ``path`` for
    ``--calibration-ids``."""
    from any4.calibration import calibration_ids

    try:
        from any4.builtin import load_builtin

        _, tok = load_builtin()
    except Exception:

        def tok(text: str) -> dict:
            return {"input_ids": list(text.encode("utf-8"))}

    with open(path, "w") as f:
        json.dump(calibration_ids("default", tok).tolist(), f)
    return path


def run_quantize(src: str, dst: str, procs: int, ids_file: str, extra: list) -> dict:
    """One streaming run in fresh processes; returns its summary (from --summary-json)."""
    summary = dst + ".summary.json"
    base = ["-m", "any4", "quantize", src, "--stream", "--out", dst, "--overwrite", "--dtype",
            "float32", "--calibration-ids", ids_file, "--summary-json", summary, *extra]  # fmt: skip
    if procs == 1:
        cmd = [sys.executable, *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master-addr=127.0.0.1", "--master-port=29571", *base]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    with open(summary) as f:
        out = json.load(f)
    out["process_wall_s"] = round(wall, 1)
    os.remove(summary)
    return out


def checkpoint_path(work: str, name: str, layers: int) -> str:
    return os.path.join(work, f"{name}-{layers}")


def ensure_checkpoint(path: str, shape: dict, layers: int) -> tuple:
    """(bytes of tensors, seconds spent writing): reuse ``path`` when a previous run wrote it
    completely (its index is written last), else write it."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index) and os.path.isfile(os.path.join(path, "config.json")):
        with open(index) as f:
            return json.load(f)["metadata"]["total_size"], 0.0
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    nbytes = write_random_checkpoint(path, shape, layers)
    return nbytes, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks of the 8B shape (32)")
    ap.add_argument("--procs", default="1,2", help="process counts, comma list (default 1,2)")
    ap.add_argument("--block70b", action="store_true", help="also time one 70B-shaped block")
    ap.add_argument("--no-8b", action="store_true", help="skip the 8B-shaped case")
    ap.add_argument("--workdir", default=None,
                    help="where the checkpoints go, under fixed names, reused when present "
                         "(default: a fresh temp dir)")  # fmt: skip
    ap.add_argument("--write-only", action="store_true", help="write the checkpoints and stop")
    ap.add_argument("--keep", action="store_true", help="keep the source checkpoints")
    ap.add_argument("--tag", default="", help="suffix of the results file names")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe, header

    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        work = args.workdir
    else:
        work = tempfile.mkdtemp(prefix="any4-scale-")
    machine = describe()
    results = {"machine": machine, "command": " ".join(sys.argv[1:]), "runs": []}
    cases = [] if args.no_8b else [("llama3-8b", LLAMA3_8B, args.layers)]
    if args.block70b:
        cases.append(("llama3-70b", LLAMA3_70B, 1))
    try:
        ids_file = calibration_ids_file(os.path.join(work, "calibration_ids.json"))
        for name, shape, layers in cases:
            src = checkpoint_path(work, name, layers)
            nbytes, gen_s = ensure_checkpoint(src, shape, layers)
            print(f"{name}: {layers} blocks, {nbytes / 1e9:.2f} GB (written in {gen_s:.0f} s)",
                  flush=True)  # fmt: skip
            if args.write_only:
                continue
            for procs in [int(p) for p in args.procs.split(",")]:
                if name == "llama3-70b" and procs != 1:
                    continue
                load_before = [round(x, 2) for x in os.getloadavg()]
                s = run_quantize(src, src + f"-any4-p{procs}", procs, ids_file, [])
                s.update(case=name, layers=layers, procs=procs, checkpoint_gb=round(nbytes / 1e9, 3),
                         load_average_before=load_before,
                         load_average_after=[round(x, 2) for x in os.getloadavg()])  # fmt: skip
                # linear projection: the per-block part of the run times the real block count,
                # plus the one-off copy of the tensors outside the blocks (embeddings, lm_head)
                once = s["seconds_write_outside_blocks"]
                s["projected_full_model_s"] = round(
                    once + (s["seconds"] - once) / layers * shape["num_hidden_layers"], 1
                )
                results["runs"].append(s)
                print(json.dumps(s), flush=True)
                shutil.rmtree(src + f"-any4-p{procs}", ignore_errors=True)
            if not args.keep:
                shutil.rmtree(src, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.write_only:
        return
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"quantize_scale{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=2)
    lines = [
        "# Streaming quantization at scale (bench/quantize_scale.py)",
        "",
        f"Command: `python bench/quantize_scale.py {results['command']}`  ",
        f"Machine: {header(machine)}; {os.cpu_count()} CPUs.  ",
        "Defaults: any4, G=128, exact (optimal) k-means, one-pass, mse weighting, float32 blocks, "
        "the default calibration as token ids.",
        "",
        "| case | blocks | procs | wall s | load | calibration | k-means | write (of which outside "
        "blocks) | peak RSS MiB (ranks) | bits/weight | projected full model s | load avg before / "
        "after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["runs"]:
        ranks = ", ".join(f"{p:.0f}" for p in s["peak_rss_mib_ranks"])
        lines.append(
            f"| {s['case']} | {s['layers']} | {s['procs']} | {s['seconds']:.1f} | {s['seconds_load']:.1f} | "
            f"{s['seconds_calibration']:.1f} | {s['seconds_kmeans']:.1f} | {s['seconds_write']:.1f} "
            f"({s['seconds_write_outside_blocks']:.1f}) | "
            f"{s['peak_rss_mib']:.0f} ({ranks}) | {s['bits_per_weight']} | {s['projected_full_model_s']:.0f} | "
            f"{s['load_average_before'][0]} / {s['load_average_after'][0]} |"
        )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
