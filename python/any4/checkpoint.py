"""``any4.quantize_checkpoint``: quantize a safetensors checkpoint larger than memory (SPEC §11).

    any4.quantize_checkpoint("Llama-3-8B/", "Llama-3-8B-any4/")      # or: any4 quantize SRC --out DST
    torchrun --nproc_per_node=2 -m any4 quantize SRC --out DST       # ranks split the k-means

The float model is never held: its skeleton is built from ``config.json`` with every parameter
on the meta device, and the model's own forward pass runs on the calibration sample with each
decoder block replaced by a stand-in that

1. loads that block's tensors from the shards (only that block's bytes, cast to ``dtype``),
2. runs the block on the hidden states it is given (with the calibration hooks: one-pass
   records every linear's input statistics on the float block; sequential quantizes each linear
   when its input arrives, so the rest of the block sees the quantized layer),
3. quantizes the block's linears (with torch.distributed, every rank quantizes a share of the
   rows of each; see ``any4.dist``), writes them with the block's other tensors to one output
   shard, saves the hidden states it returns, and frees the block.

The input embedding only gets the rows of the calibration tokens; embeddings, norms and
``lm_head`` are copied byte for byte (in their dtype). Peak memory is about one block in
``dtype`` (float32 by default) + the calibration activations + a constant. The result is bit
for bit that of ``any4.quantize_model`` on the model loaded with
``from_pretrained(src, dtype=dtype)`` (same settings), and its files are byte-identical for any
number of processes.

Output directory (checkpoint format v2): ``model-0000i-of-0000N.safetensors`` (the first holds
the tensors outside the decoder blocks, then one per block), ``model.safetensors.index.json``,
``config.json`` with ``quantization_config``, ``any4.json``, tokenizer files and
``generation_config.json``. Work happens in ``DST.any4-partial`` next to DST; DST appears (by
rename) only when complete. After an interruption, ``resume=True`` (``--resume``) continues
after the last completed block.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import resource
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .atomic import fsync_directory
from .calibration import (
    DEFAULT_MAX_TOKENS,
    ActivationRecorder,
    Calibration,
    calibration_ids,
    is_token_id_list,
    run_model,
)
from .dist import Group, local_world_size, row_ranges, row_slice_seed, threads_per_rank
from .integrity import metadata_text, seal_file
from .kmeans import DEFAULT_METHOD, DEFAULT_N_INIT
from .model import check_settings, layer_quantize_kwargs, plan_layers
from .nn import QuantLinear, dense_features, is_conv1d
from .quantize import QuantizedTensor, quantize
from .refine import DEFAULT_REFINE, check_refine
from .safetensors_stream import (
    TORCH_DTYPES,
    CheckpointError,
    Entry,
    read_header,
    write_file,
    write_json,
)
from .stats import DEFAULT_WEIGHTING

FORMAT_VERSION = 2
# With several ranks, a block's layers are cut into about CHUNKS_PER_RANK * world row ranges
# (at least MIN_CHUNK_ROWS rows each), claimed by the ranks as they go (_Job.quantize_claimed).
CHUNKS_PER_RANK = 48
MIN_CHUNK_ROWS = 8
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PARTIAL_SUFFIX = ".any4-partial"
STATE_NAME = "state.json"
REST_FILE = "rest.safetensors"
EXTRA_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "vocab.txt", "spiece.model", "tokenizer.tiktoken",
)  # fmt: skip
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _StopForward(Exception):
    """Raised by the last block's stand-in when nothing after the blocks needs the forward."""


# ---- the source checkpoint -------------------------------------------------------------------


class SourceCheckpoint:
    """A Hugging Face safetensors checkpoint directory: ``config.json`` and ``model.safetensors``
    or shards with ``model.safetensors.index.json``. Headers are read (and checked) up front;
    tensors are read one at a time (only the bytes of that tensor, or of a row range)."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} is not a directory")
        self.config_path = os.path.join(self.directory, "config.json")
        if not os.path.isfile(self.config_path):
            raise CheckpointError(f"missing {self.config_path}")
        try:
            with open(self.config_path, encoding="utf-8") as f:
                self.config_dict = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {self.config_path}: {e}") from e
        if "quantization_config" in self.config_dict:
            raise CheckpointError(
                f"{self.config_path} has a quantization_config: {self.directory} is already "
                "quantized; quantize the float checkpoint instead"
            )
        index = os.path.join(self.directory, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise ValueError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"cannot read {index}: {e}") from e
        elif os.path.isfile(os.path.join(self.directory, SINGLE_NAME)):
            weight_map = None
        else:
            raise CheckpointError(
                f"{self.directory} has neither {SINGLE_NAME} nor {INDEX_NAME} (a safetensors "
                "checkpoint directory is needed)"
            )
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        self.files = files
        self.tensors: dict = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                keys = [k for k, v in (weight_map or {}).items() if v == name]
                raise CheckpointError(
                    f"missing checkpoint shard {path} (holds {len(keys)} tensors, e.g. {keys[0]!r})"
                    if keys
                    else f"missing checkpoint shard {path}"
                )
            infos, _ = read_header(path)
            for key, info in infos.items():
                if weight_map is None or weight_map.get(key) == name:
                    self.tensors[key] = info
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self.tensors:
                    raise CheckpointError(
                        f"{os.path.join(self.directory, name)}: tensor {key!r} listed in {INDEX_NAME} is not in the file"
                    )

    def fingerprint(self) -> list:
        """(file, size, mtime) of the shards: a resumed run checks the source did not change."""
        out = []
        for name in self.files:
            st = os.stat(os.path.join(self.directory, name))
            out.append([name, st.st_size, st.st_mtime_ns])
        return out

    def prefetch(self, keys: Sequence[str]) -> None:
        """Ask the kernel to start reading these tensors' bytes into the page cache (readahead
        in the background: the next block's reads then overlap this block's compute; page
        cache is not this process's RSS). A no-op where posix_fadvise is missing."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        by_file: dict = {}
        for key in keys:
            info = self.tensors.get(key)
            if info is not None and info.nbytes:
                by_file.setdefault(info.file, []).append(info)
        for path, infos in by_file.items():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # load() reports unreadable files
            try:
                for info in infos:
                    advise(fd, info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def load(
        self, key: str, dtype: Optional[torch.dtype] = None, rows: Optional[tuple] = None
    ) -> torch.Tensor:
        """Tensor ``key`` (rows ``rows[0]:rows[1]`` only, when given), cast to ``dtype``.

        Read with plain file reads of exactly its bytes, at the offsets of the checked header
        (a memory map would keep every page read in the process's RSS while mapped)."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint {self.directory}")
        dt = TORCH_DTYPES.get(info.dtype)
        if dt is None:
            raise CheckpointError(f"{info.file}: tensor {key!r} has unsupported dtype {info.dtype}")
        shape = list(info.shape)
        start, nbytes = info.start, info.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0] if shape and shape[0] else 0
            r0, r1 = max(0, int(rows[0])), min(shape[0], int(rows[1]))
            start, nbytes, shape[0] = start + r0 * row_bytes, (r1 - r0) * row_bytes, r1 - r0
        buf = bytearray(nbytes)
        try:
            with open(info.file, "rb") as f:
                f.seek(start)
                got = f.readinto(buf)
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {info.file}: {e}") from e
        if got != nbytes:
            raise CheckpointError(f"{info.file}: tensor {key!r} is truncated")
        t = (
            torch.frombuffer(buf, dtype=dt).reshape(shape)
            if nbytes
            else torch.empty(shape, dtype=dt)
        )
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t


# ---- the model skeleton -----------------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) and their
    buffers (e.g. rotary frequencies, computed at construction) on the CPU as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_skeleton(src: SourceCheckpoint, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``src/config.json`` with its parameters on the meta device."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(
            "quantizing a checkpoint needs transformers: pip install 'any4[model]'"
        ) from e
    config = AutoConfig.from_pretrained(src.directory, local_files_only=True)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied parameters: one meta tensor, stored once in the checkpoint
    return model.eval()


def find_blocks(model: nn.Module) -> tuple:
    """(dotted name, nn.ModuleList) of the decoder blocks: the ModuleList holding most parameters."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    if best is None:
        raise CheckpointError("the model has no list of decoder blocks (nn.ModuleList) to stream")
    return best


def _source_keys(model: nn.Module, src: SourceCheckpoint) -> dict:
    """{state-dict key: source tensor key} (tied parameters map to the one key stored); checks
    that every parameter is in the checkpoint with the shape config.json implies."""
    state = model.state_dict(keep_vars=True)
    params = {id(p) for p in model.parameters()}
    by_tensor: dict = {}
    for key, t in state.items():
        by_tensor.setdefault(id(t), []).append(key)
    out = {}
    for key, t in state.items():
        stored = [k for k in by_tensor[id(t)] if k in src.tensors]
        if not stored:
            if id(t) in params:
                raise CheckpointError(
                    f"tensor {key!r} (shape {list(t.shape)}, from {src.config_path}) is missing from the checkpoint"
                )
            continue  # a buffer the model computes itself
        info = src.tensors[stored[0]]
        if tuple(info.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{info.file}: tensor {stored[0]!r} has shape {list(info.shape)}, but "
                f"{src.config_path} implies {list(t.shape)} (config/shape mismatch)"
            )
        out[key] = stored[0]
    unused = sorted(set(src.tensors) - set(out.values()))
    if unused:
        warnings.warn(
            f"any4: {len(unused)} checkpoint tensor(s) are not used by the model and not copied (e.g. {unused[0]!r})",
            stacklevel=3,
        )
    return out


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    parent._parameters[leaf] = nn.Parameter(value, requires_grad=False)


# ---- the stand-in for one decoder block -------------------------------------------------------


class _StreamedBlock(nn.Module):
    """Takes a decoder block's place in the model; its forward streams the block (see _Run)."""

    def __init__(self, run: _Run, index: int, block: nn.Module):
        super().__init__()
        self.__dict__["_run"] = run
        self.__dict__["_block"] = block  # not registered: the skeleton's names stay the model's
        self.index = index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run.run_block(self.index, args, kwargs)

    def __getattr__(self, name: str) -> Any:  # e.g. decoder_layer.attention_type
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _release_memory() -> None:
    """Free what a finished block left behind and give the pages back to the OS: collect
    reference cycles (a cycle holding one block's float weights would keep ~1 GB of an 8B
    model's block alive into the next one), then ``malloc_trim(0)`` (glibc keeps freed heap
    pages otherwise, and the heap, fragmented by the block's many-megabyte temporaries, grows
    block after block)."""
    global _LIBC
    gc.collect()
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- the job -----------------------------------------------------------------------------------


class _Job:
    """What every rank knows: the source, the skeleton, the layers and the settings."""

    def __init__(self, src: SourceCheckpoint, settings: dict, group: Group):
        self.src = src
        self.settings = settings
        self.group = group
        self.dtype = settings["_dtype"]
        self.f = check_settings(
            settings["fmt"],
            settings["group_size"],
            settings["mode"],
            settings["weighting"],
            settings["method"],
        )
        self.model = build_skeleton(src, self.dtype)
        self.keys = _source_keys(self.model, src)
        self.blocks_name, self.blocks = find_blocks(self.model)
        self.block_modules = list(self.blocks)
        with warnings.catch_warnings():
            if not group.is_writer:
                warnings.simplefilter("ignore")
            self.layers, self.group_sizes = plan_layers(
                self.model, settings["group_size"], settings["skip"]
            )
        # {name: (N, K)}; GPT-2-style Conv1D layers store their weight transposed, [K, N]
        self.features = {n: dense_features(m) for n, m in self.layers.items()}
        self.transposed = {n for n, m in self.layers.items() if is_conv1d(m)}
        self.needs_stats = self.f.learned and settings["weighting"] != "none"
        # any4's readers drop the guard, an empty tensor under the first quantized layer's weight
        # key: transformers without any4 refuses the checkpoint on its size (see any4.io)
        self.guard = f"{next(iter(self.layers))}.weight" if self.layers else None
        quantized_weights = {n + ".weight" for n in self.layers}
        self.tied = {
            k: v for k, v in sorted(self.keys.items()) if k != v and k not in quantized_weights
        }
        self.options = dict(
            weighting=settings["weighting"],
            method=settings["method"],
            n_init=settings["n_init"],
            seed=settings["seed"],
            refine=settings.get("refine", DEFAULT_REFINE),
        )
        prefix = self.blocks_name + "."
        self.block_layers: list = [[] for _ in range(len(self.blocks))]
        self.outer_layers: list = []
        for name in self.layers:
            if name.startswith(prefix):
                self.block_layers[int(name[len(prefix) :].split(".")[0])].append(name)
            else:
                self.outer_layers.append(name)
        self.whole: dict = {}  # {name: whole weight read from a [K, N] file} (ranks > 0)
        self.rows_done = 0  # weight rows this rank has quantized
        td = settings["table_dtype"]
        self.table_dtype = (
            _DTYPES[td]
            if td
            else (torch.float16 if self.dtype == torch.float16 else torch.bfloat16)
        )

    def weight_key(self, name: str) -> str:
        return self.keys[name + ".weight"]

    def load_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of layer ``name``'s weight [r1 - r0, K], read from the source."""
        if name in self.transposed:  # [K, N] on file: these output columns
            return self.src.load(self.weight_key(name), self.dtype).t()[r0:r1]
        return self.src.load(self.weight_key(name), self.dtype, rows=(r0, r1))

    def quantize_rows(
        self, name: str, stats: Any, r0: int, r1: int, weights: Optional[dict] = None
    ) -> Any:
        """Rows r0:r1 of layer ``name`` quantized, as (packed, lut, scales); an error string
        instead of raising (the writer reports it). The weight comes from ``weights`` (the
        writer's block in memory) or the source (rows r0:r1 only; the writer has just read
        that block, so this is served by the page cache)."""
        try:
            if weights is not None and name in weights:
                w = weights[name].detach()
                w = (w.t() if name in self.transposed else w)[r0:r1].cpu()
            elif name in self.transposed:  # read (and transposed) once per call, not per chunk
                if name not in self.whole:
                    self.whole[name] = self.load_rows(name, 0, self.features[name][0])
                w = self.whole[name][r0:r1]
            else:
                w = self.load_rows(name, r0, r1)
            kw = layer_quantize_kwargs(self.f.name, stats, **self.options)
            if "seed" in kw:  # the same per-row seeds as the whole matrix
                kw["seed"] = row_slice_seed(kw["seed"], r0)
            qt = quantize(
                w,
                self.f.name,
                self.group_sizes[name],
                dtype=str(self.table_dtype).replace("torch.", ""),
                **kw,
            )
        except (CheckpointError, ValueError, RuntimeError, TypeError) as e:
            info = self.src.tensors.get(self.weight_key(name))
            where = f" (from {info.file})" if info is not None else ""
            return f"cannot quantize {name}.weight{where}: {e}"
        return (qt.packed, qt.lut, qt.scales)

    def quantize_share(self, items: list, weights: Optional[dict] = None) -> list:
        """This rank's contiguous share of each layer of ``items`` [(name, stats)], as
        (packed, lut, scales) or None (no rows); an error string instead of raising."""
        out = []
        for name, stats in items:
            r0, r1 = row_ranges(self.features[name][0], self.group.world)[self.group.rank]
            out.append(None if r1 == r0 else self.quantize_rows(name, stats, r0, r1, weights))
        return out

    def chunks(self, items: list) -> list:
        """[(item index, r0, r1)]: the layers of ``items`` cut into row ranges of about
        1/(CHUNKS_PER_RANK * world) of their elements, handed out to the ranks as they ask."""
        total = sum(self.features[name][0] * self.features[name][1] for name, _ in items)
        target = max(1, total // (CHUNKS_PER_RANK * self.group.world))
        out = []
        for j, (name, _) in enumerate(items):
            n, k = self.features[name]
            step = max(MIN_CHUNK_ROWS, target // max(1, k))
            out += [(j, r0, min(n, r0 + step)) for r0 in range(0, n, step)]
        return out

    def quantize_claimed(self, items: list, tag: str, weights: Optional[dict] = None) -> dict:
        """{chunk index: result of quantize_rows} for the chunks (see ``chunks``) this rank
        claims from the job's shared counter: a rank that finishes early takes more, so the
        ranks finish together whatever their speed (their results are the same either way).
        ``tag``: this call's name, the same on every rank (from the writer's broadcast)."""
        chunks = self.chunks(items)
        claim = self.group.claimer(len(chunks), tag)
        out = {}
        for c in iter(claim, None):
            j, r0, r1 = chunks[c]
            name, stats = items[j]
            out[c] = self.quantize_rows(name, stats, r0, r1, weights)
            self.rows_done += r1 - r0
        return out

    def worker_loop(self) -> None:
        """Ranks other than 0: quantize shares on request until the writer says it is done."""
        while True:
            cmd = self.group.broadcast(None)
            if cmd[0] == "quantize":
                self.group.gather_tensors(self.quantize_claimed(cmd[1], cmd[2]))
                self.whole.clear()
            elif cmd[0] == "end":
                self.group.gather((_peak_rss_mib(), self.rows_done))
                return
            else:  # "abort": the writer failed and reports why
                return


class _Run:
    """Rank 0: drives the forward pass, quantizes (with the other ranks), writes, resumes."""

    def __init__(
        self,
        job: _Job,
        dst: str,
        ids: Optional[torch.Tensor],
        device: torch.device,
        resume: bool,
        progress: bool,
    ):
        self.job = job
        self.dst = dst
        self.partial = dst.rstrip("/\\") + PARTIAL_SUFFIX
        self.ids = ids
        self.device = device
        self.progress = progress
        self.times = dict.fromkeys(("load", "calibration", "kmeans", "write"), 0.0)
        self.bits = 0.0
        self.weights_total = 0
        self.missing: list = []
        self.layer_info: dict = {}
        self.fingerprint = self._fingerprint()
        settings = {k: v for k, v in job.settings.items() if not k.startswith("_")}
        settings["calibration_tokens"] = int(ids.numel()) if ids is not None else 0
        settings["layers"] = len(job.layers)
        src_dtype = job.src.config_dict.get("dtype") or job.src.config_dict.get("torch_dtype")
        settings["model_dtype"] = src_dtype if src_dtype in _DTYPES else settings["dtype"]
        self.file_settings = settings
        self.state = self._open_state(resume)
        self.done = set(self.state["done"])
        self.resumed_blocks = len(self.done)

    # -- state ------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict:
        s = {k: v for k, v in self.job.settings.items() if not k.startswith("_")}
        ids_digest = None
        if self.ids is not None:
            ids_digest = hashlib.sha256(self.ids.numpy().tobytes()).hexdigest()
        return {"settings": s, "calibration_ids": ids_digest, "source": self.job.src.fingerprint()}

    def _open_state(self, resume: bool) -> dict:
        path = os.path.join(self.partial, STATE_NAME)
        if os.path.isdir(self.partial):
            if resume and os.path.isfile(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        state = json.load(f)
                except (OSError, ValueError) as e:
                    raise CheckpointError(
                        f"cannot resume: {path} is unreadable ({e}); remove {self.partial}"
                    ) from e
                if state.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
                    raise CheckpointError(
                        f"cannot resume: the interrupted run in {self.partial} used other settings, "
                        "calibration or source files; run without --resume to start over"
                    )
                return state
            if not resume:
                print(
                    f"any4: removing the interrupted run in {self.partial} (pass --resume to continue one)"
                )
            shutil.rmtree(self.partial)
        os.makedirs(self.partial)
        state = {"fingerprint": self.fingerprint, "done": [], "carry_kind": "tensor"}
        write_json(path, state)
        return state

    def _commit_block(self, index: int, carry: Optional[torch.Tensor], kind: str) -> None:
        if carry is not None:
            from safetensors.torch import save_file

            path = os.path.join(self.partial, f"carry-{index:05d}.safetensors")
            save_file({"hidden": carry.detach().cpu().contiguous()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        self.done.add(index)
        self.state["done"] = sorted(self.done)
        self.state["carry_kind"] = kind
        self.state.setdefault("layers", {}).update(
            {n: self.layer_info[n] for n in self.job.block_layers[index]}
        )
        self.state.setdefault("bits", {})[str(index)] = [self.block_bits, self.block_weights]
        write_json(os.path.join(self.partial, STATE_NAME), self.state)
        for name in os.listdir(self.partial):  # older carries are no longer needed
            if name.startswith("carry-") and name != f"carry-{index:05d}.safetensors":
                os.remove(os.path.join(self.partial, name))

    def _carry(self, index: int) -> Any:
        from safetensors.torch import load_file

        path = os.path.join(self.partial, f"carry-{index:05d}.safetensors")
        try:
            h = load_file(path)["hidden"]
        except Exception as e:
            raise CheckpointError(
                f"cannot resume: {path} is unreadable ({e}); run without --resume"
            ) from e
        return (h,) if self.state.get("carry_kind") == "tuple" else h

    # -- quantization -----------------------------------------------------------------------------

    def quantize_layers(self, items: list, weights: dict, biases: dict) -> dict:
        """{name: QuantLinear} for [(name, stats)], the rows split across the ranks."""
        job = self.job
        t0 = time.perf_counter()
        tag = uuid.uuid4().hex  # names this call's shared work counter
        job.group.broadcast(("quantize", items, tag))
        if job.group.world == 1:  # one call per layer, every row
            results = dict(enumerate(job.quantize_share(items, weights)))
            job.rows_done += sum(job.features[name][0] for name, _ in items)
            chunks = [(j, 0, job.features[name][0]) for j, (name, _) in enumerate(items)]
        else:
            with _torch_threads(threads_per_rank()):  # the forward's threads would oversubscribe
                mine = job.quantize_claimed(items, tag, weights)
            results = {}
            for part in job.group.gather_tensors(mine):
                results.update(part)
            chunks = job.chunks(items)
        shares_of: list = [[] for _ in items]
        for c, (j, _, _) in enumerate(chunks):
            shares_of[j].append(results[c])
        out = {}
        for j, (name, _) in enumerate(items):
            shares = shares_of[j]
            errors = [s for s in shares if isinstance(s, str)]
            if errors:
                raise CheckpointError(errors[0])
            shares = [s for s in shares if s is not None]
            lut = torch.cat([s[1] for s in shares]) if job.f.learned else shares[0][1]
            qt = QuantizedTensor(
                packed=torch.cat([s[0] for s in shares]),
                lut=lut,
                scales=torch.cat([s[2] for s in shares]),
                shape=job.features[name],
                fmt=job.f.name,
                group_size=job.group_sizes[name],
            )
            q = QuantLinear.from_quantized(qt, biases.get(name))
            out[name] = q
            self.layer_info[name] = {
                "fmt": q.fmt,
                "group_size": q.group_size,
                "shape": [q.out_features, q.in_features],
                "bias": q.bias is not None,
                "table_dtype": str(q.lut.dtype).replace("torch.", ""),
            }
            self.block_bits += q.bits_per_weight * q.in_features * q.out_features
            self.block_weights += q.in_features * q.out_features
        self.times["kmeans"] += time.perf_counter() - t0
        return out

    def _process(self, names: list, modules: dict, call: Any, timed: bool = True) -> tuple:
        """Run ``call()`` (the forward of the modules holding ``names``) under the calibration
        hooks and quantize the layers like quantize_model: one-pass after the call, sequential
        as each layer's input arrives (``timed``: count the call as calibration time). Returns
        (call's output, {name: QuantLinear})."""
        job = self.job
        done: dict = {}
        weights = {n: modules[n].weight for n in names}
        biases = {n: modules[n].bias for n in names if modules[n].bias is not None}
        out = None
        if call is not None and job.needs_stats and names:
            pause = [0.0]

            def quantize_now(name: str, module: nn.Module, x: torch.Tensor) -> None:
                if job.settings["mode"] != "sequential" or name in done:
                    return
                t_pause = time.perf_counter()
                q = self.quantize_layers([(name, recorder.stats[name])], weights, biases)[name]
                with torch.no_grad():  # the rest of this pass sees the quantized layer
                    w = q.dequantize(module.weight.dtype)
                    module.weight.data = (w.t() if name in job.transposed else w).to(
                        module.weight.device
                    )
                done[name] = q
                pause[0] += time.perf_counter() - t_pause

            with ActivationRecorder(
                {n: modules[n] for n in names}, on_input=quantize_now
            ) as recorder:
                t0 = time.perf_counter()
                out = call()
                if timed:
                    self.times["calibration"] += time.perf_counter() - t0 - pause[0]
            # recorder <-> quantize_now is a reference cycle holding ``weights`` (the block's
            # float weights): break it, or the block stays in memory until the cyclic GC runs
            recorder.on_input = None
            stats = recorder.stats
            self.missing += [n for n in names if stats[n].count == 0]
        else:
            stats = {}
            if call is not None:
                out = call()
        todo = [(n, stats.get(n)) for n in names if n not in done]
        if todo:
            done.update(self.quantize_layers(todo, weights, biases))
        weights.clear()
        return out, done

    # -- blocks -----------------------------------------------------------------------------------

    def _materialize(self, module: nn.Module, prefix: str) -> float:
        t0 = time.perf_counter()
        for local, p in list(module.named_parameters()):
            key = self.job.keys[prefix + local]
            t = self.job.src.load(key, self.job.dtype if p.is_floating_point() else None)
            _set_param(module, local, t.to(self.device))
        self.times["load"] += time.perf_counter() - t0
        return 0.0

    @staticmethod
    def _free(module: nn.Module) -> None:
        for local, p in list(module.named_parameters()):
            _set_param(module, local, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def run_block(self, index: int, args: Any, kwargs: Any) -> Any:
        """Stream block ``index``: load, calibrate (``args``/``kwargs``: the block's inputs;
        None: no forward), quantize, write, free; returns the block's output."""
        job = self.job
        forward = args is not None
        if index in self.done:
            out = None
            if forward:
                out = (
                    self._carry(index)
                    if index == max(self.done)
                    else (args[0] if args else kwargs.get("hidden_states"))
                )
            self._after_block(index, forward)
            return out
        block = job.block_modules[index]
        prefix = f"{job.blocks_name}.{index}."
        self.block_bits, self.block_weights = 0.0, 0
        self._materialize(block, prefix)
        if index + 1 < len(job.block_modules):  # read the next block while this one computes
            after = f"{job.blocks_name}.{index + 1}."
            job.src.prefetch([v for k, v in job.keys.items() if k.startswith(after)])
        names = job.block_layers[index]
        modules = {n: block.get_submodule(n[len(prefix) :]) for n in names}
        call = None
        if forward:
            dargs, dkwargs = _to_device(args, self.device), _to_device(kwargs, self.device)

            def call() -> Any:
                with torch.no_grad():
                    return block(*dargs, **dkwargs)

        out, quantized = self._process(names, modules, call)
        self._write_block(index, prefix, quantized)
        self._free(block)
        del modules, quantized
        _release_memory()
        kind = "tuple" if isinstance(out, tuple) else "tensor"
        carry = out[0] if isinstance(out, tuple) else out
        self._commit_block(index, carry, kind)
        self.block_bits, self.block_weights = 0.0, 0
        self._after_block(index, forward)
        if out is not None and self.device.type != "cpu":
            out = _to_device(out, torch.device("cpu"))
        return out

    def _after_block(self, index: int, forward: bool) -> None:
        self.bar.update(1)
        if forward and index == len(self.job.block_modules) - 1 and self.stop_after_blocks:
            raise _StopForward

    # -- files ------------------------------------------------------------------------------------

    def _file_metadata(self, layers: dict) -> Any:
        from . import __version__

        def finish(meta: dict, digests: dict) -> dict:
            doc = {
                "format": "any4-safetensors",
                "format_version": FORMAT_VERSION,
                "any4_version": __version__,
                "layers": layers,
                "tied": self.job.tied,
                "sha256": dict(sorted(digests.items())),
                "settings": self.file_settings,
                "extra": {},
            }
            if self.job.guard is not None:
                doc["guard"] = self.job.guard
            return {"format": "pt", "any4": metadata_text(doc)}  # digest: the seal placeholder

        return finish

    def _entries(self, keys: Sequence[str], quantized: dict) -> list:
        """Sorted entries: quantized layers' packed/lut/scales (+ bias copied), others copied."""
        job = self.job
        entries = []
        qweights = {n + ".weight" for n in quantized}
        qbiases = {n + ".bias" for n in quantized}
        for key in keys:
            if key in qweights or key not in job.keys:
                continue
            src_key = job.keys[key]
            if src_key != key and key not in qbiases:
                continue  # a tied alias: stored once, under the key the source uses
            entries.append(Entry.of(key, job.src.tensors[src_key]))
        for name, q in quantized.items():
            for part in ("packed", "lut", "scales"):
                entries.append(Entry.of(f"{name}.{part}", getattr(q, part)))
            if job.guard == name + ".weight":
                entries.append(Entry.of(job.guard, torch.zeros(0, dtype=torch.uint8)))
        return sorted(entries, key=lambda e: e.key)

    def _write(self, path: str, entries: list, layers: dict) -> None:
        t0 = time.perf_counter()
        try:
            write_file(path + ".tmp", entries, finish_metadata=self._file_metadata(layers))
            seal_file(path + ".tmp")  # one sha256 over the whole file (any4.integrity)
            os.replace(path + ".tmp", path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
            what = (
                "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
            )
            raise OSError(
                e.errno,
                f"{what} while writing {path} (the finished blocks are kept in {self.partial}: "
                "free space and run again with --resume)",
            ) from e
        self.times["write"] += time.perf_counter() - t0

    def _write_block(self, index: int, prefix: str, quantized: dict) -> None:
        keys = [k for k in self.job.keys if k.startswith(prefix)]
        layers = {n: self.layer_info[n] for n in sorted(quantized)}
        self._write(
            os.path.join(self.partial, f"block-{index:05d}.safetensors"),
            self._entries(keys, quantized),
            layers,
        )

    # -- the whole run ----------------------------------------------------------------------------

    def run(self) -> dict:
        job = self.job
        start = time.perf_counter()
        n_blocks = len(job.block_modules)
        self.bar = tqdm(total=n_blocks, desc=f"any4 quantize {job.f.name} G={job.settings['group_size']}",
                        unit="block", disable=not self.progress)  # fmt: skip
        self.layer_info.update(self.state.get("layers", {}))
        model = job.model
        outer_modules: dict = {}
        calibrated = job.needs_stats and self.ids is not None
        self.stop_after_blocks = not (calibrated and job.outer_layers)
        outer_q = None
        self.block_bits, self.block_weights = 0.0, 0
        if calibrated and (len(self.done) < n_blocks or not self.stop_after_blocks):
            self._prepare_prefix(outer=not self.stop_after_blocks)
            outer_modules = {n: model.get_submodule(n) for n in job.outer_layers}
            for i, block in enumerate(job.block_modules):
                job.blocks[i] = _StreamedBlock(self, i, block)
            try:
                forward = lambda: run_model(model, self.ids, torch.device("cpu"))  # noqa: E731
                _, outer_q = self._process(job.outer_layers, outer_modules, forward, timed=False)
            except _StopForward:
                pass
            finally:
                for i, block in enumerate(job.block_modules):
                    job.blocks[i] = block
        else:
            for i in range(n_blocks):
                self.run_block(i, None, None)
        if outer_q is None:  # outer layers without calibration (fixed formats / weighting none)
            self.block_bits, self.block_weights = 0.0, 0
            weights = {n: self.job.src.load(job.weight_key(n), job.dtype) for n in job.outer_layers}
            biases = {
                n: self.job.src.load(job.keys[n + ".bias"], job.dtype)
                for n in job.outer_layers
                if n + ".bias" in job.keys
            }
            outer_q = (
                self.quantize_layers([(n, None) for n in job.outer_layers], weights, biases)
                if weights
                else {}
            )
        outer_bits = (self.block_bits, self.block_weights)
        self.bar.close()
        if self.missing:
            warnings.warn(
                f"any4: {len(self.missing)} layer(s) saw no calibration input (e.g. {self.missing[0]}); they are "
                "quantized without sample weights",
                stacklevel=3,
            )
        # the tensors outside the blocks
        prefix = job.blocks_name + "."
        rest_keys = [k for k in job.keys if not k.startswith(prefix)]
        layers = {n: self.layer_info[n] for n in sorted(outer_q)}
        t_rest = time.perf_counter()
        self._write(
            os.path.join(self.partial, REST_FILE), self._entries(rest_keys, outer_q), layers
        )
        t_rest = time.perf_counter() - t_rest  # the copy of embeddings, lm_head, norms (once)
        job.group.broadcast(("end",))
        ends = job.group.gather((_peak_rss_mib(), job.rows_done))
        peaks = [e[0] for e in ends]
        summary = self._finish(outer_bits)
        summary.update(
            seconds=round(time.perf_counter() - start, 3),
            **{f"seconds_{k}": round(v, 3) for k, v in self.times.items()},
            seconds_write_outside_blocks=round(t_rest, 3),
            peak_rss_mib=round(max(peaks), 1),
            peak_rss_mib_ranks=[round(p, 1) for p in peaks],
            rows_quantized_ranks=[e[1] for e in ends],
            world_size=job.group.world,
            resumed_blocks=self.resumed_blocks,
        )
        return summary

    def _prepare_prefix(self, outer: bool) -> None:
        """Load what the forward needs before (and, with ``outer``, after) the blocks: the
        calibration tokens' rows of the input embedding, and the other tensors outside the
        blocks (norms, ...), except the output embedding unless it is calibrated."""
        job = self.job
        model = job.model
        emb = model.get_input_embeddings()
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip_params = set()
        ids = self.ids
        if isinstance(emb, nn.Embedding) and isinstance(emb.weight, nn.Parameter):
            key = next(
                k for k, p in model.named_parameters(remove_duplicate=False) if p is emb.weight
            )
            uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            vocab = job.src.tensors[job.keys[key]].shape[0]
            if int(uniq[0]) < 0 or int(uniq[-1]) >= vocab:
                raise ValueError(
                    f"calibration token ids must lie in [0, {vocab}) (the embedding {key}), got "
                    f"{int(uniq[0])}..{int(uniq[-1])}"
                )
            t0 = time.perf_counter()
            rows, run_start = [], 0
            u = uniq.tolist()
            for j in range(1, len(u) + 1):  # one read per run of consecutive token ids
                if j == len(u) or u[j] != u[j - 1] + 1:
                    rows.append(
                        job.src.load(job.keys[key], job.dtype, rows=(u[run_start], u[j - 1] + 1))
                    )
                    run_start = j
            table = torch.cat(rows)
            size = max(len(u), (emb.padding_idx + 1) if emb.padding_idx is not None else 0)
            if size > len(u):
                table = torch.cat([table, table.new_zeros(size - len(u), table.shape[1])])
            emb.weight = nn.Parameter(table, requires_grad=False)
            emb.num_embeddings = size
            self.ids = inverse.reshape(ids.shape)
            self.times["load"] += time.perf_counter() - t0
            skip_params.add(id(emb.weight))
        if out_emb is not None and not outer:
            skip_params.update(id(p) for p in out_emb.parameters())
        block_params = {id(p) for b in job.block_modules for p in b.parameters()}
        t0 = time.perf_counter()
        for key, p in list(model.named_parameters()):
            if id(p) in skip_params or id(p) in block_params or not p.is_meta:
                continue
            t = job.src.load(job.keys[key], job.dtype if p.is_floating_point() else None)
            _set_param(model, key, t)
        self.times["load"] += time.perf_counter() - t0

    def _finish(self, outer_bits: tuple) -> dict:
        """Name the shards, write index, config, any4.json and tokenizer; rename into place."""
        job = self.job
        n_blocks = len(job.block_modules)
        bits = sum(b for b, _ in self.state.get("bits", {}).values()) + outer_bits[0]
        weights = sum(w for _, w in self.state.get("bits", {}).values()) + outer_bits[1]
        sources = [REST_FILE] + [f"block-{i:05d}.safetensors" for i in range(n_blocks)]
        total = len(sources)
        names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        weight_map, files, total_size = {}, {}, 0
        for old, new in zip(sources, names):
            path = os.path.join(self.partial, old)
            infos, meta = read_header(path)
            doc = json.loads(meta.get("any4", "{}"))
            for key, info in infos.items():
                weight_map[key] = new
                total_size += info.nbytes
            files[new] = doc.get("digest")  # the file's seal (any4.integrity), as any4.io lists it
            os.replace(path, os.path.join(self.partial, new))
        write_json(
            os.path.join(self.partial, INDEX_NAME),
            {
                "metadata": {"total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )
        layers = {n: self.layer_info[n] for n in job.layers}
        s = job.settings
        qconfig = {
            "quant_method": "any4",
            "format_version": FORMAT_VERSION,
            "fmt": job.f.name,
            "group_size": s["group_size"],
            "weighting": s["weighting"] if job.f.learned else None,
            "method": s["method"] if job.f.learned else None,
            "mode": s["mode"],
            "table_dtype": str(job.table_dtype).replace("torch.", ""),
            "modules_to_not_convert": list(s["skip"]),
            "layers": layers,
        }
        if job.guard is not None:
            qconfig["guard"] = job.guard
        config = dict(job.src.config_dict)
        config["quantization_config"] = qconfig
        write_json(os.path.join(self.partial, "config.json"), config)
        from . import __version__

        summary = {
            "format": "any4-safetensors",
            "format_version": FORMAT_VERSION,
            "any4_version": __version__,
            "layers": layers,
            "tied": job.tied,
            "settings": self.file_settings,
            "extra": {},
            "files": files,
        }
        if job.guard is not None:
            summary["guard"] = job.guard
        write_json(os.path.join(self.partial, "any4.json"), summary)
        for name in EXTRA_FILES:
            path = os.path.join(job.src.directory, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(self.partial, name))
        for name in os.listdir(self.partial):
            if name.startswith("carry-") or name == STATE_NAME:
                os.remove(os.path.join(self.partial, name))
        fsync_directory(self.partial)
        old = None
        if os.path.exists(self.dst):
            old = self.dst.rstrip("/\\") + ".any4-old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(self.dst, old)
        os.replace(self.partial, self.dst)
        fsync_directory(os.path.dirname(os.path.abspath(self.dst)))
        if old is not None:
            shutil.rmtree(old)
        return {
            "dst": self.dst,
            "blocks": n_blocks,
            "layers": len(job.layers),
            "files": total,
            "bits_per_weight": round(bits / weights, 4) if weights else None,
        }


def summary_line(summary: dict) -> str:
    """One line: wall time (and its split), peak RSS, bits/weight."""
    bpw = summary.get("bits_per_weight")
    return (
        f"any4: quantized {summary['layers']} layers in {summary['blocks']} blocks -> {summary['dst']}: "
        f"{bpw:.3f} bits/weight, "
        * (bpw is not None)
        + f"wall {summary['seconds']:.1f} s (load {summary['seconds_load']:.1f}, calibration "
        f"{summary['seconds_calibration']:.1f}, k-means {summary['seconds_kmeans']:.1f}, write "
        f"{summary['seconds_write']:.1f}), peak RSS {summary['peak_rss_mib']:.0f} MiB, "
        f"{summary['world_size']} process(es)"
    )


def is_checkpoint_dir(path: str) -> bool:
    """True for a directory with config.json and safetensors weights (what this module reads)."""
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and (
            os.path.isfile(os.path.join(path, INDEX_NAME))
            or os.path.isfile(os.path.join(path, SINGLE_NAME))
        )
    )


def quantize_checkpoint(
    src: Union[str, os.PathLike],
    dst: Union[str, os.PathLike],
    fmt: str = "any4",
    group_size: int = 128,
    calibration: Calibration = "default",
    *,
    tokenizer: Any = None,
    mode: str = "one-pass",
    weighting: str = DEFAULT_WEIGHTING,
    method: str = DEFAULT_METHOD,
    n_init: int = DEFAULT_N_INIT,
    seed: int = 0,
    table_dtype: Optional[Union[str, torch.dtype]] = None,
    skip: Sequence[str] = ("lm_head",),
    max_calibration_tokens: Optional[int] = DEFAULT_MAX_TOKENS,
    dtype: Union[str, torch.dtype] = "float32",
    device: Optional[Union[str, torch.device]] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    group: Optional[Group] = None,
    refine: int = DEFAULT_REFINE,
) -> Optional[dict]:
    """Quantize the safetensors checkpoint directory ``src`` into ``dst``, one decoder block at
    a time (see the module docstring).

    Args:
        src: a Hugging Face checkpoint directory (config.json, model.safetensors or shards +
            model.safetensors.index.json; tokenizer files are copied).
        dst: the output directory (checkpoint format v2); it appears only when complete.
        fmt, group_size, calibration, tokenizer, mode, weighting, method, n_init, seed,
            table_dtype, skip, max_calibration_tokens, refine: as for ``any4.quantize_model`` (the text
            calibration is tokenized with ``tokenizer``, else the tokenizer in ``src``).
        dtype: the dtype the blocks are computed and quantized in (default float32, the dtype
            ``any4 quantize`` uses in memory; "auto": the checkpoint's ``torch_dtype``).
        device: where each block's calibration forward runs (default: CUDA when available).
        resume: continue an interrupted run of the same settings from ``DST.any4-partial``.
        overwrite: replace an existing ``dst`` (after the new one is complete).
        progress: a progress bar per block (with ETA) on stderr.
        group: the processes sharing the work (default: from torchrun's environment, else one).
    Returns:
        On the writer (rank 0): a summary dict (dst, blocks, layers, files, bits_per_weight,
        seconds and its split seconds_load / _calibration / _kmeans / _write, peak_rss_mib,
        world_size, rows_quantized_ranks (weight rows each rank quantized: with several ranks
        the rows are handed out as the ranks ask for them), resumed_blocks); None on the other
        ranks.
    Raises:
        CheckpointError (a ValueError): missing/corrupt shard, config/shape mismatch, settings
        that do not match the run being resumed; the message names the file and tensor.
        FileExistsError: ``dst`` exists and ``overwrite`` is False. OSError: disk full (the
        finished blocks stay in ``DST.any4-partial`` for ``resume``).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if isinstance(skip, str):
        skip = (skip,)
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if isinstance(table_dtype, torch.dtype):
        table_dtype = str(table_dtype).replace("torch.", "")
    if table_dtype is not None and table_dtype not in _DTYPES:
        raise ValueError(f"table_dtype must be one of {tuple(_DTYPES)}, got {table_dtype!r}")
    check_settings(fmt, group_size, mode, weighting, method)
    refine = check_refine(refine)
    source = SourceCheckpoint(src)
    if dtype == "auto":
        dtype = str(
            source.config_dict.get("dtype") or source.config_dict.get("torch_dtype") or "float32"
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)} or 'auto', got {dtype!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("dst must differ from src")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    owns_group = group is None
    if group is None:
        group = Group.from_env(str(device))
    try:
        if group.world > 1:
            import any4

            any4.set_num_threads(threads_per_rank())
            # rank 0 runs the calibration forward while the others wait: give it the cores
            # (torchrun sets OMP_NUM_THREADS=1 for every process)
            torch.set_num_threads(threads_per_rank() * local_world_size() if group.is_writer else 1)
        settings = {
            "fmt": get_fmt_name(fmt), "group_size": int(group_size), "mode": mode, "weighting": weighting,
            "method": method, "n_init": int(n_init), "seed": int(seed), "table_dtype": table_dtype,
            "skip": list(skip), "dtype": dtype, "max_calibration_tokens": max_calibration_tokens,
            "refine": int(refine), "_dtype": _DTYPES[dtype],
        }  # fmt: skip
        job = _Job(source, settings, group)
        if not group.is_writer:
            job.worker_loop()
            return None
        ids = None
        if job.needs_stats and job.layers:
            if (
                tokenizer is None
                and not isinstance(calibration, torch.Tensor)
                and not is_token_id_list(calibration)
            ):
                tokenizer = _source_tokenizer(src)
            seq_len = getattr(job.model.config, "max_position_embeddings", None)
            ids = calibration_ids(calibration, tokenizer, max_calibration_tokens, seq_len)
        try:
            run = _Run(job, dst, ids, device, resume, progress)
            summary = run.run()
        except BaseException:
            if group.world > 1:
                with contextlib.suppress(Exception):
                    group.broadcast(("abort",))
            raise
        if progress:
            import sys

            print(summary_line(summary), file=sys.stderr)
        return summary
    finally:
        if owns_group:
            group.close()


def get_fmt_name(fmt: str) -> str:
    from .formats import get_format

    return get_format(fmt).name


def _source_tokenizer(src: str) -> Any:
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(src, local_files_only=True)
    except Exception as e:
        raise CheckpointError(
            f"calibration text needs a tokenizer and {src} has none that loads ({e}); pass "
            "tokenizer=... or token ids"
        ) from e


__all__ = [
    "CheckpointError",
    "SourceCheckpoint",
    "is_checkpoint_dir",
    "quantize_checkpoint",
    "summary_line",
]
