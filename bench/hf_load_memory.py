"""Peak memory of transformers' from_pretrained on the built-in model (offline), per path:

- float:        the float32 Hugging Face folder, plain from_pretrained (the baseline);
- prequantized: an any4 checkpoint (written by save_pretrained) loaded with from_pretrained
                (QuantLinear shells on the meta device, packed tensors assigned);
- on_load_int4: from_pretrained(float folder, quantization_config=Any4Config(fmt="int4")):
                each weight quantized as it is read;
- on_load_any4: Any4Config(fmt="any4"): the float model loads, then quantize_model calibrates.

Each path runs in its own subprocess; RSS is read after the imports and a warm-up model build
(before) and the process peak (ru_maxrss) after loading; "added" = peak - before. Also checks
that the pre-quantized model's logits equal the model saved, bit for bit.

    python bench/hf_load_memory.py [--out bench/results/hf_load_memory] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
import torch, any4, any4.hf
from transformers import AutoModelForCausalLM, LlamaConfig

def status(field):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))

def reset_peak():  # VmHWM restarts at the current RSS (ru_maxrss would keep the parent's peak)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

mode, path = sys.argv[1], sys.argv[2]
AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=2))
kwargs = {}
if mode.startswith("on_load_"):
    kwargs["quantization_config"] = any4.Any4Config(fmt=mode[len("on_load_"):], group_size=128)
reset_peak()
before = status("VmRSS")
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
seconds = time.perf_counter() - start
peak = status("VmHWM")
ids = torch.arange(1, 33).reshape(1, -1)
with torch.no_grad():
    logits = model(input_ids=ids).logits  # touches every weight (mmap'd pages count from here)
peak_forward = status("VmHWM")
torch.save(logits, sys.argv[3])
quantized = sum(isinstance(m, any4.QuantLinear) for m in model.modules())
print(json.dumps({"mode": mode, "before": before, "peak": peak, "added": peak - before,
                  "added_with_forward": peak_forward - before, "seconds": round(seconds, 2),
                  "quantized_layers": quantized}))
"""


def run(mode: str, path: str, logits_file: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, path, logits_file],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if n.endswith(".safetensors"))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results/hf_load_memory")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    import torch

    import any4
    from any4.builtin import load_builtin

    work = args.workdir or tempfile.mkdtemp(prefix="any4_hf_mem_")
    float_dir, q_dir = os.path.join(work, "float"), os.path.join(work, "any4")
    saved = os.path.join(work, "saved_logits.pt")
    if not os.path.isfile(saved):  # the checkpoints (kept in --workdir for a re-run)
        model, tok = load_builtin()
        model.save_pretrained(float_dir)
        tok.save_pretrained(float_dir)
        from transformers import AutoModelForCausalLM

        q = AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=any4.Any4Config(fmt="any4", group_size=128)
        )
        q.save_pretrained(q_dir, max_shard_size="50MB")
        ids = torch.arange(1, 33).reshape(1, -1)
        with torch.no_grad():
            torch.save(q(input_ids=ids).logits, saved)
        del q, model
    saved_logits = torch.load(saved)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    rows = []
    for mode, path in (("float", float_dir), ("prequantized", q_dir), ("on_load_int4", float_dir),
                       ("on_load_any4", float_dir)):  # fmt: skip
        logits_file = os.path.join(work, f"{mode}.pt")
        r = run(mode, path, logits_file)
        if mode == "prequantized":
            r["logits_equal_saved"] = bool(torch.equal(torch.load(logits_file), saved_logits))
        if mode == "on_load_any4":
            r["logits_equal_saved"] = bool(torch.equal(torch.load(logits_file), saved_logits))
        rows.append(r)
        print(json.dumps(r), flush=True)
    result = {
        "float_dir_bytes": dir_bytes(float_dir),
        "any4_dir_bytes": dir_bytes(q_dir),
        "rows": rows,
        "loadavg_before": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    mib = 2**20
    lines = [
        "# Peak memory of from_pretrained, built-in model (SmolLM2-135M), offline",
        "",
        f"float folder {result['float_dir_bytes'] / mib:.0f} MiB (float32 safetensors); any4 folder "
        f"{result['any4_dir_bytes'] / mib:.0f} MiB (any4 G=128, 50MB shards). Load average before: "
        f"{' '.join(load)}. `python bench/hf_load_memory.py`",
        "",
        "| path | peak RSS added by from_pretrained | ... and one forward pass | load seconds | QuantLinear layers |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['added'] / mib:.0f} MiB | {r['added_with_forward'] / mib:.0f} MiB "
            f"| {r['seconds']} | {r['quantized_layers']} |"
        )
    lines += [
        "",
        "RSS is VmHWM (reset after the imports and a warm-up, so it is this load's own peak), "
        "which counts the safetensors pages transformers memory-maps only once they are read: "
        "a float load touches little until the first forward pass reads every weight, hence the "
        "second column. Quantize on load reads and quantizes every float weight (int4: one at a "
        "time; any4: the whole float model, then quantize_model).",
    ]
    lines.append("")
    lines.append(
        "prequantized logits == the saved model's: "
        + str(next(r for r in rows if r["mode"] == "prequantized")["logits_equal_saved"])
        + "; on_load_any4 logits == the model that was saved (quantized on load the same way): "
        + str(next(r for r in rows if r["mode"] == "on_load_any4")["logits_equal_saved"])
    )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
