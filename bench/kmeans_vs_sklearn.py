"""Weighted 1-D k-means of any4 (SPEC §2) against scikit-learn and ckwrap, in the same run.

    python bench/kmeans_vs_sklearn.py [--rows 4096] [--cols 4096] [--subset 64]

1. Quantizes a rows x cols matrix (built-in synthetic LLM-like weight, any4.demo) to any4 with
   G = 128 and "mse" sample weights (E[x^2] per channel times group scale^2), with every method:
   wall time on all threads, and CPU time on one thread.
2. Feeds the very same rows (group-normalised u, element weights; computed here exactly as the
   quantizer does) to per-row scikit-learn KMeans(n_clusters=16, init="k-means++", n_init=1,
   same sample weights) and ckwrap.ckmeans (exact, weighted) for a subset of rows; their time is
   scaled up to all rows. Reports time ratios and the mean weighted inertia ratio (every
   inertia recomputed here in float64 from the returned centroids and labels).

Timing: single-threaded work is timed as CPU time of the calling thread (time.thread_time), so
that other processes on a shared machine do not distort the ratios; scikit-learn is limited to
one thread for that (threadpoolctl; on an idle 2-core machine its 2-thread time on one row is
within a few percent of the 1-thread time). Multi-threaded runs are wall-clock.
3. Lloyd with n_init in {1, 2, 4, 8} against the exact optimum on realistic rows: Gaussian and
   heavy-tailed (Student t, 3 dof) weight rows, group-normalised, weights = random positive
   channel statistics times the group scale.
4. If the Google Benchmark binary is built (build/bench/bench_kmeans, see bench/bench_kmeans.cpp),
   its one-row figures (1 thread, C++ only, no Python) are included.
Writes bench/results/kmeans_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

import any4
from any4.demo import builtin_matrix
from any4.kmeans import DEFAULT_N_INIT
from any4.stats import ChannelStats, channel_weight

K_CLUSTERS = 16
GROUP = 128
RESULTS = Path(__file__).resolve().parent / "results"
BENCH_BINARY = Path(__file__).resolve().parent.parent / "build" / "bench" / "bench_kmeans"


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "any4_threads": any4.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def normalise(w: np.ndarray, chan: np.ndarray, power: int):
    """(u, element weights), float32 [rows, cols], exactly as the C++ quantizer computes them."""
    rows, cols = w.shape
    u = np.empty_like(w)
    wt = np.empty_like(w)
    top = np.float32(15)
    for g0 in range(0, cols, GROUP):
        x = w[:, g0 : g0 + GROUP]
        lo = x.min(axis=1, keepdims=True)
        hi = x.max(axis=1, keepdims=True)
        s = (hi - lo) / top
        safe = np.where(s > 0, s, np.float32(1))
        u[:, g0 : g0 + GROUP] = np.where(s > 0, (x - lo) / safe, np.float32(7.5))
        f = np.ones_like(s) if power == 0 else (s if power == 1 else s * s)
        wt[:, g0 : g0 + GROUP] = chan[None, g0 : g0 + GROUP] * f
    return u, wt


def inertia(u: np.ndarray, wt: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> float:
    c = np.asarray(centres, np.float64).reshape(-1)
    d = u.astype(np.float64) - c[np.asarray(labels).reshape(-1)]
    return float(np.sum(wt.astype(np.float64) * d * d))


def timed(fn, repeat: int = 1, clock=time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def sklearn_rows(u, wt, seed0=0, one_thread: bool = True):
    """Per-row sklearn KMeans: CPU time on 1 thread, or wall time with its default threads."""
    import contextlib
    import warnings

    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    inert, secs = [], []
    clock = time.thread_time if one_thread else time.perf_counter
    limit = threadpool_limits(limits=1) if one_thread else contextlib.nullcontext()
    with limit, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(u.shape[0]):
            x = u[r].astype(np.float64)[:, None]
            sw = wt[r].astype(np.float64)
            t0 = clock()
            km = KMeans(K_CLUSTERS, init="k-means++", n_init=1, random_state=seed0 + r)
            km.fit(x, sample_weight=sw)
            secs.append(clock() - t0)
            inert.append(inertia(u[r], wt[r], km.cluster_centers_, km.labels_))
    return np.array(inert), float(np.median(secs)), float(np.mean(secs))


def ckwrap_rows(u, wt):
    import ckwrap

    inert, secs = [], []
    for r in range(u.shape[0]):
        x = u[r].astype(np.float64)
        sw = wt[r].astype(np.float64)
        t0 = time.thread_time()
        res = ckwrap.ckmeans(x, K_CLUSTERS, weights=sw)
        secs.append(time.thread_time() - t0)
        inert.append(inertia(u[r], wt[r], res.centers, res.labels))
    return np.array(inert), float(np.median(secs)), float(np.mean(secs))


def any4_rows(u, wt, threads: int, **kw):
    """(inertia per row, seconds per row) of any4.kmeans on the whole batch of rows: CPU time
    of this thread with 1 thread (the core runs inline), wall time otherwise."""
    old = any4.get_num_threads()
    any4.set_num_threads(threads)
    try:
        any4.kmeans(u[:2], wt[:2], K_CLUSTERS, **kw)  # warm-up
        out = {}

        def run():
            out["res"] = any4.kmeans(u, wt, K_CLUSTERS, **kw)

        clock = time.thread_time if threads == 1 else time.perf_counter
        secs = timed(run, repeat=3, clock=clock) / u.shape[0]
    finally:
        any4.set_num_threads(old)
    cent, codes = out["res"]
    inert = np.array([inertia(u[r], wt[r], cent[r], codes[r]) for r in range(u.shape[0])])
    return inert, secs


def cpp_benchmark() -> dict:
    """One-row C++ timings (CPU time, 1 thread) from bench_kmeans, if it is built."""
    if not BENCH_BINARY.exists():
        return {}
    env = dict(os.environ, ANY4_NUM_THREADS="1")
    out = subprocess.run(
        [str(BENCH_BINARY), "--benchmark_filter=Row4096", "--benchmark_format=json"],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        return {}
    data = json.loads(out.stdout)
    return {
        b["name"]: {"cpu_us": b["cpu_time"], "mean_inertia": b.get("mean_inertia")}
        for b in data["benchmarks"]
    }


def realistic_rows(kind: str, rows: int, cols: int, seed: int):
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        w = rng.standard_normal((rows, cols))
    else:
        w = rng.standard_t(3, size=(rows, cols))
    chan = np.exp(rng.standard_normal(cols)).astype(np.float32) ** 2  # E[x^2]-like, log-normal
    return normalise(w.astype(np.float32), chan, 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--subset", type=int, default=64, help="rows timed with sklearn / ckwrap")
    ap.add_argument("--sweep-rows", type=int, default=256, help="rows per kind in the n_init sweep")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)

    info = machine()
    w, x = builtin_matrix(a.rows, a.cols)
    stats = ChannelStats()
    stats.update(x[:256])
    chan, power = channel_weight(stats, "mse")
    res: dict = {"machine": info, "shape": [a.rows, a.cols], "group_size": GROUP, "k": K_CLUSTERS}

    # 1. full quantization: wall time on all threads, CPU time on one thread
    quant, quant_cpu1 = {}, {}
    threads = info["any4_threads"]
    for label, kw in (
        (f"lloyd n_init={DEFAULT_N_INIT}", {"method": "lloyd", "n_init": DEFAULT_N_INIT}),
        ("lloyd n_init=1", {"method": "lloyd", "n_init": 1}),
        ("optimal", {"method": "optimal"}),
    ):

        def run(kw=kw):
            any4.quantize(w, "any4", GROUP, sample_weight=chan, scale_power=power, **kw)

        any4.quantize(w[:8], "any4", GROUP, sample_weight=chan, scale_power=power, **kw)
        quant[label] = timed(run, repeat=2)
        any4.set_num_threads(1)
        try:
            quant_cpu1[label] = timed(run, repeat=1, clock=time.thread_time)
        finally:
            any4.set_num_threads(threads)
        print(
            f"any4.quantize {a.rows}x{a.cols} {label}: {quant[label]:.3f} s wall on {threads} "
            f"threads, {quant_cpu1[label]:.3f} s CPU on 1 thread"
        )
    res["quantize_seconds_wall"] = quant
    res["quantize_seconds_cpu_1thread"] = quant_cpu1

    # 2. the same rows through sklearn / ckwrap / any4.kmeans (subset)
    u, wt = normalise(w, chan, power)
    sub = np.linspace(0, a.rows - 1, a.subset).astype(int)
    us, wts = np.ascontiguousarray(u[sub]), np.ascontiguousarray(wt[sub])
    sk_in, sk_med, sk_mean = sklearn_rows(us, wts)
    _, _, sk_default_mean = sklearn_rows(us, wts, one_thread=False)
    ck_in, ck_med, ck_mean = ckwrap_rows(us, wts)
    rows_out = {}
    for label, kw in (
        (f"lloyd n_init={DEFAULT_N_INIT}", {"method": "lloyd", "n_init": DEFAULT_N_INIT}),
        ("lloyd n_init=1", {"method": "lloyd", "n_init": 1}),
        ("optimal", {"method": "optimal"}),
    ):
        for threads in (1, info["any4_threads"]):
            inert, secs = any4_rows(us, wts, threads, **kw)
            rows_out[f"{label}, {threads} thread(s)"] = {
                "seconds_per_row": secs,
                "speedup_vs_sklearn": sk_mean / secs,
                "speedup_vs_sklearn_default_threads_wall": sk_default_mean / secs,
                "speedup_vs_ckwrap": ck_mean / secs,
                "mean_inertia_ratio_vs_sklearn": float(inert.mean() / sk_in.mean()),
                "mean_of_row_ratios_vs_sklearn": float(np.mean(inert / sk_in)),
                "mean_inertia_ratio_vs_ckwrap": float(inert.mean() / ck_in.mean()),
                "max_row_ratio_vs_ckwrap": float(np.max(inert / ck_in)),
            }
    res["per_row"] = {
        "rows": int(a.subset),
        "sklearn_seconds_per_row": {"median": sk_med, "mean": sk_mean},
        "sklearn_default_threads_wall_seconds_per_row": sk_default_mean,
        "ckwrap_seconds_per_row": {"median": ck_med, "mean": ck_mean},
        "sklearn_mean_inertia_ratio_vs_optimal": float(sk_in.mean() / ck_in.mean()),
        "any4": rows_out,
    }
    # CPU cost of the whole quantization (1 thread) vs per-row sklearn / ckwrap CPU time x rows
    res["quantize_vs_sklearn_scaled"] = {
        label: (sk_mean * a.rows) / secs for label, secs in quant_cpu1.items() if "lloyd" in label
    }
    res["quantize_vs_ckwrap_scaled"] = {"optimal": (ck_mean * a.rows) / quant_cpu1["optimal"]}

    # 3. n_init sweep against the exact optimum, realistic rows
    sweep = {}
    for kind, seed in (("gaussian", 1), ("student_t3", 2)):
        ur, wr = realistic_rows(kind, a.sweep_rows, a.cols, seed)
        opt_in, opt_s = any4_rows(ur, wr, 1, method="optimal")
        entry = {"optimal_seconds_per_row_1thread": opt_s}
        for n_init in (1, 2, 4, 8):
            inert, secs = any4_rows(ur, wr, 1, method="lloyd", n_init=n_init)
            rel = inert / opt_in
            entry[f"n_init={n_init}"] = {
                "seconds_per_row_1thread": secs,
                "mean_excess_over_optimal": float(rel.mean() - 1),
                "p90_excess": float(np.percentile(rel, 90) - 1),
                "max_excess": float(rel.max() - 1),
            }
        sweep[kind] = entry
    res["n_init_sweep"] = {"rows_per_kind": a.sweep_rows, **sweep}
    res["cpp_one_row"] = cpp_benchmark()

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "kmeans_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "kmeans_cpu.md").write_text(markdown(res, a))
    print(markdown(res, a))


def markdown(res: dict, a) -> str:
    m = res["machine"]
    pr = res["per_row"]
    lines = [
        "# Weighted 1-D k-means: any4 vs scikit-learn and ckwrap (SPEC §2)",
        "",
        f"Command: `python bench/kmeans_vs_sklearn.py --rows {a.rows} --cols {a.cols} "
        f"--subset {a.subset}`  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, any4 threads {m['any4_threads']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m.get('load_average_at_start', []))}.  ",
        f"Matrix: built-in synthetic {a.rows}x{a.cols} (any4.demo), G={GROUP}, k={K_CLUSTERS}, "
        "mse sample weights (E[x^2] x group scale^2).",
        "",
        "## Full any4 quantization (any4.quantize, whole matrix)",
        "",
        f"| method | wall s, {m['any4_threads']} threads | CPU s, 1 thread "
        "| 1-thread CPU vs per-row sklearn x rows | vs per-row ckwrap x rows |",
        "|---|---|---|---|---|",
    ]
    for label, secs in res["quantize_seconds_wall"].items():
        cpu = res["quantize_seconds_cpu_1thread"][label]
        sk = res["quantize_vs_sklearn_scaled"].get(label)
        ck = res["quantize_vs_ckwrap_scaled"].get(label)
        lines.append(
            f"| {label} | {secs:.3f} | {cpu:.3f} | {f'{sk:.0f}x' if sk else '-'} "
            f"| {f'{ck:.1f}x' if ck else '-'} |"
        )
    lines += [
        "",
        f"## Per row ({pr['rows']} rows of the same matrix, same u and weights)",
        "",
        "Per-row times: CPU time with 1 thread, wall time with more.  ",
        f"sklearn KMeans(16, k-means++, n_init=1, 1 thread): {pr['sklearn_seconds_per_row']['mean'] * 1e3:.2f} ms/row "
        f"(median {pr['sklearn_seconds_per_row']['median'] * 1e3:.2f}); "
        f"sklearn with its default threads: {pr['sklearn_default_threads_wall_seconds_per_row'] * 1e3:.2f} "
        "ms/row wall; "
        f"ckwrap.ckmeans (exact): {pr['ckwrap_seconds_per_row']['mean'] * 1e3:.2f} ms/row; "
        f"sklearn inertia / optimal = {pr['sklearn_mean_inertia_ratio_vs_optimal']:.4f}.",
        "",
        "| any4 | us/row | speed-up vs sklearn (1 thread) | vs sklearn (default threads, wall) | vs ckwrap "
        "| inertia / sklearn (ratio of means) | mean of row ratios | inertia / optimal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in pr["any4"].items():
        lines.append(
            f"| {label} | {r['seconds_per_row'] * 1e6:.1f} | {r['speedup_vs_sklearn']:.0f}x "
            f"| {r['speedup_vs_sklearn_default_threads_wall']:.0f}x | {r['speedup_vs_ckwrap']:.1f}x | {r['mean_inertia_ratio_vs_sklearn']:.4f} "
            f"| {r['mean_of_row_ratios_vs_sklearn']:.4f} | {r['mean_inertia_ratio_vs_ckwrap']:.5f} |"
        )
    sw = res["n_init_sweep"]
    lines += [
        "",
        f"## Lloyd restarts vs the exact optimum ({sw['rows_per_kind']} rows per kind, 1 thread)",
        "",
        "| rows | method | us/row | mean excess inertia | p90 | max |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("gaussian", "student_t3"):
        e = sw[kind]
        lines.append(
            f"| {kind} | optimal | {e['optimal_seconds_per_row_1thread'] * 1e6:.1f} | 0 | 0 | 0 |"
        )
        for n_init in (1, 2, 4, 8):
            r = e[f"n_init={n_init}"]
            lines.append(
                f"| {kind} | lloyd n_init={n_init} | {r['seconds_per_row_1thread'] * 1e6:.1f} "
                f"| {r['mean_excess_over_optimal'] * 100:.2f}% | {r['p90_excess'] * 100:.2f}% "
                f"| {r['max_excess'] * 100:.2f}% |"
            )
    if res.get("cpp_one_row"):
        sk = pr["sklearn_seconds_per_row"]["mean"] * 1e6
        ck = pr["ckwrap_seconds_per_row"]["mean"] * 1e6
        lines += [
            "",
            "## One row in C++ (bench_kmeans, Google Benchmark, CPU time, 1 thread)",
            "",
            "Ratios against the sklearn / ckwrap per-row CPU times measured above.",
            "",
            "| benchmark | us | vs sklearn | vs ckwrap | mean inertia (64 rows) |",
            "|---|---|---|---|---|",
        ]
        for name, b in res["cpp_one_row"].items():
            lines.append(
                f"| {name} | {b['cpu_us']:.1f} | {sk / b['cpu_us']:.0f}x | {ck / b['cpu_us']:.1f}x "
                f"| {b['mean_inertia']:.6f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
