"""any4.save / any4.load: safetensors + JSON metadata, bit-identical round trips, clear errors."""

from __future__ import annotations

import copy
import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")

from _tiny import random_ids, tiny_config, tiny_llama  # noqa: E402

import any4  # noqa: E402
from any4.io import FORMAT_VERSION, Any4FormatError, read_metadata  # noqa: E402
from any4.nn import QuantLinear  # noqa: E402


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llama(seed=3)
    any4.quantize_model(model, "any4", 32, random_ids(64, seed=4), progress=False)
    # One layer in another format and table dtype, to check per-layer metadata.
    lin = tiny_llama(seed=3).model.layers[1].mlp.up_proj
    model.model.layers[1].mlp.up_proj = QuantLinear.from_linear(
        lin, "nf4", 16, table_dtype=torch.float16
    )
    return model


def test_round_trip_into_fresh_transformers_model(quantized, tmp_path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "q"
    file = any4.save(quantized, out)
    assert (
        os.path.isfile(file) and (out / "any4.json").is_file() and (out / "config.json").is_file()
    )
    ids = random_ids(33, seed=5, rows=2)
    expected = outputs(quantized, ids)

    # The documented recipe: a fresh model of the same config, then any4.load(DIR, model=...).
    config = AutoConfig.from_pretrained(out)
    fresh = AutoModelForCausalLM.from_config(config)
    loaded = any4.load(out, model=fresh)
    assert loaded is fresh
    assert torch.equal(outputs(loaded, ids), expected)
    up = loaded.model.layers[1].mlp.up_proj
    assert (up.fmt, up.group_size, up.lut.dtype) == ("nf4", 16, torch.float16)
    assert loaded.model.layers[0].self_attn.k_proj.fmt == "any4"
    # Tied embeddings stay tied (stored once in the file).
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert read_metadata(out)["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert loaded.any4_settings["fmt"] == "any4"

    # Without a model: built from the saved config.json.
    again = any4.load(out)
    assert torch.equal(outputs(again, ids), expected)


def test_save_file_and_load_into_float_model(quantized, tmp_path) -> None:
    file = tmp_path / "m.safetensors"
    any4.save(quantized, file)
    target = tiny_llama(seed=99)  # different float weights: all are overwritten
    ids = random_ids(20, seed=6)
    assert torch.equal(outputs(any4.load(file, model=target), ids), outputs(quantized, ids))


def test_bfloat16_model_round_trip(tmp_path) -> None:
    model = tiny_llama(seed=4, dtype=torch.bfloat16)
    any4.quantize_model(model, "int4", 16, progress=False)
    any4.save(model, tmp_path / "bf")
    fresh = tiny_llama(seed=5)  # float32: parameters take the saved dtype
    loaded = any4.load(tmp_path / "bf", model=fresh)
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    ids = random_ids(17, seed=7)
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))


def test_dict_of_quantized_tensors(tmp_path) -> None:
    w = torch.randn(24, 40)
    qt = any4.quantize(w, "any3", 16, dtype="bfloat16")
    extra = torch.arange(5.0)
    file = tmp_path / "d.safetensors"
    any4.save({"layer": qt, "other": extra}, file, extra={"note": "test"})
    back = any4.load(file)
    assert set(back) == {"layer", "other"} and torch.equal(back["other"], extra)
    q2 = back["layer"]
    assert (q2.fmt, q2.group_size, q2.shape) == ("any3", 16, (24, 40))
    assert torch.equal(any4.dequantize(q2), any4.dequantize(qt))
    assert read_metadata(file)["extra"] == {"note": "test"}


def _digest(t) -> str:
    import hashlib

    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def _as_v1(file) -> None:
    """Rewrite an any4 file as format version 1 wrote it (per-tensor data checksums only)."""

    def to_v1(meta):
        meta.pop("digest")
        meta["format_version"] = 1

    def add_sums(tensors):
        sums.update({k: _digest(t) for k, t in tensors.items()})

    sums: dict = {}
    _rewrite(file, mutate_tensors=add_sums)
    _rewrite(file, mutate_meta=lambda m: (to_v1(m), m.update(sha256=sums)))


def _rewrite(file, mutate_meta=None, mutate_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    any4_meta = json.loads(meta["any4"])
    if mutate_meta:
        mutate_meta(any4_meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    meta["any4"] = json.dumps(any4_meta)
    save_file(tensors, str(file), metadata=meta)


def test_truncated_tampered_and_newer_files_fail_clearly(quantized, tmp_path) -> None:
    good = tmp_path / "good.safetensors"
    any4.save(quantized, good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(Any4FormatError, match="truncated|not a readable"):
        any4.load(truncated, model=tiny_llama())

    flipped = tmp_path / "flipped.safetensors"
    raw = bytearray(data)
    raw[-100] ^= 0x5A  # a byte of the tensor data
    flipped.write_bytes(bytes(raw))
    with pytest.raises(Any4FormatError, match="digest"):
        any4.load(flipped, model=tiny_llama())

    newer = tmp_path / "newer.safetensors"
    newer.write_bytes(data)
    _rewrite(newer, mutate_meta=lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(Any4FormatError, match="upgrade"):
        any4.load(newer, model=tiny_llama())

    # Format version 2: any re-written metadata or tensor is refused by the digest.
    def regroup(m):
        m["layers"]["model.layers.0.mlp.gate_proj"].update(group_size=16)

    def swap(tensors):  # replace a tensor with another of the same shape
        key = "model.layers.0.mlp.gate_proj.packed"
        tensors[key] = torch.flip(tensors[key], dims=[0]).contiguous()

    for name, edit in (("shape", {"mutate_meta": regroup}), ("swap", {"mutate_tensors": swap})):
        edited = tmp_path / f"{name}.safetensors"
        edited.write_bytes(data)
        _rewrite(edited, **edit)
        with pytest.raises(Any4FormatError, match="does not match its digest"):
            any4.load(edited, model=tiny_llama())

    # Format version 1 (data checksums only) still loads; its metadata is checked field by field.
    v1 = tmp_path / "v1.safetensors"
    v1.write_bytes(data)
    _as_v1(v1)
    torch.testing.assert_close(
        outputs(any4.load(v1, model=tiny_llama()), random_ids(8, seed=9)),
        outputs(any4.load(good, model=tiny_llama()), random_ids(8, seed=9)),
        rtol=0,
        atol=0,
    )
    v1_data = v1.read_bytes()
    bad_shape = tmp_path / "v1shape.safetensors"
    bad_shape.write_bytes(v1_data)
    _rewrite(bad_shape, mutate_meta=regroup)
    with pytest.raises(Any4FormatError, match="gate_proj"):
        any4.load(bad_shape, model=tiny_llama())
    swapped = tmp_path / "v1swapped.safetensors"
    swapped.write_bytes(v1_data)
    _rewrite(swapped, mutate_tensors=swap)
    with pytest.raises(Any4FormatError, match="checksum|digest"):
        any4.load(swapped, model=tiny_llama())

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(Any4FormatError, match="no any4 metadata"):
        any4.load(foreign)
    with pytest.raises(FileNotFoundError):
        any4.load(tmp_path / "missing.safetensors")


def test_wrong_architecture_fails(quantized, tmp_path) -> None:
    file = tmp_path / "m.safetensors"
    any4.save(quantized, file)
    other = tiny_llama()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(ValueError, match="layers.1"):
        any4.load(file, model=other)
    with pytest.raises(TypeError):
        any4.save("not a model", tmp_path / "x.safetensors")


def test_loaded_model_is_independent_copy(quantized, tmp_path) -> None:
    file = tmp_path / "m.safetensors"
    any4.save(quantized, file)
    loaded = any4.load(file, model=copy.deepcopy(tiny_llama(seed=3)))
    loaded.model.layers[0].self_attn.q_proj.lut.zero_()
    assert not torch.equal(
        loaded.model.layers[0].self_attn.q_proj.lut, quantized.model.layers[0].self_attn.q_proj.lut
    )
    assert tiny_config().hidden_size == quantized.config.hidden_size


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def test_low_bit_layers_dense_on_disk_and_version1_nibbles_still_load(tmp_path) -> None:
    """3/2-bit layers are stored densely with their code_layout; the same model written the
    format-version-1 way (codes in nibbles, no code_layout) loads to the same codes, so its
    outputs (and so its perplexity) are identical."""
    import numpy as np

    from conftest import unpack_ref

    model = tiny_llama(seed=3)
    any4.quantize_model(model, "any3", 32, random_ids(64, seed=4), progress=False)
    lin = tiny_llama(seed=3).model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = QuantLinear.from_linear(lin, "any2", 32)
    ids = random_ids(33, seed=5, rows=2)
    expected = outputs(model, ids)

    file = tmp_path / "dense.safetensors"
    any4.save(model, file)
    meta = read_metadata(file)
    assert meta["format_version"] == FORMAT_VERSION == 2
    layers = meta["layers"]
    assert layers["model.layers.0.mlp.down_proj"]["code_layout"] == "dense"
    assert layers["model.layers.0.self_attn.q_proj"]["code_layout"] == "dense"
    with safetensors.safe_open(str(file), framework="pt") as f:
        for name, info in layers.items():
            N, K = info["shape"]
            bits = int(info["fmt"][-1])
            assert tuple(f.get_tensor(f"{name}.packed").shape) == (N, -(-bits * K // 8))
    assert torch.equal(outputs(any4.load(file, model=tiny_llama(seed=9)), ids), expected)

    def to_version1(m):
        m.pop("digest", None)  # version 1: per-tensor checksums (below)
        m["format_version"] = 1
        for info in m["layers"].values():
            del info["code_layout"]

    def to_nibbles(tensors):
        for name, info in layers.items():
            N, K = info["shape"]
            bits = int(info["fmt"][-1])
            codes = unpack_ref(tensors[f"{name}.packed"].numpy(), K, bits).astype(np.uint8)
            if K % 2:
                codes = np.pad(codes, ((0, 0), (0, 1)))
            tensors[f"{name}.packed"] = torch.from_numpy(codes[:, 0::2] | (codes[:, 1::2] << 4))

    old = tmp_path / "v1.safetensors"
    any4.save(model, old)

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(old), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    any4_meta = json.loads(header["any4"])
    to_version1(any4_meta)
    to_nibbles(tensors)
    any4_meta["sha256"] = {k: _digest(t) for k, t in tensors.items()}
    header["any4"] = json.dumps(any4_meta)
    save_file(tensors, str(old), metadata=header)
    assert os.path.getsize(old) > os.path.getsize(file)  # nibbles cost more bytes

    loaded = any4.load(old, model=tiny_llama(seed=9))
    assert torch.equal(outputs(loaded, ids), expected)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            back = loaded.get_submodule(name)
            assert torch.equal(back.packed, m.packed)  # repacked densely on load
            assert torch.equal(back.dequantize(), m.dequantize())
    # A layout the tensors do not have, or an unknown one, is refused (files resealed).
    from any4 import integrity

    for layout, error in (("nibble", "bytes per row"), ("planes", "unknown code layout")):
        sealed = integrity.read_file(file)
        meta = dict(sealed.any4)
        meta["layers"]["model.layers.0.mlp.down_proj"]["code_layout"] = layout
        bad = tmp_path / f"{layout}.safetensors"
        integrity.write_file(bad, sealed.tensors, meta)
        with pytest.raises(Any4FormatError, match=error):
            any4.load(bad, model=tiny_llama(seed=9))


def test_resealed_dtype_reinterpretation_is_refused(quantized, tmp_path) -> None:
    """A writer that stored float32 weights as int32 (same bytes) and sealed the file: the digest
    is valid, but the model's float parameter refuses an integer tensor."""
    from any4 import integrity

    good = tmp_path / "good.safetensors"
    any4.save(quantized, good)
    sealed = integrity.read_file(good)
    tensors = dict(sealed.tensors)
    key = "model.embed_tokens.weight"
    tensors[key] = tensors[key].view(torch.int32)
    doc = {k: v for k, v in sealed.any4.items() if k != "digest"}
    bad = tmp_path / "bad.safetensors"
    integrity.write_file(bad, tensors, doc)
    with pytest.raises(Any4FormatError, match="embed_tokens.*not the same kind"):
        any4.load(bad, model=tiny_llama())


def test_sharded_checkpoint_every_shard_sealed_and_cross_checked(quantized, tmp_path) -> None:
    """Each shard carries its own digest; any4.json lists them; config.json's layers must match
    the shards' metadata; any changed byte of any file is refused (also on the from_pretrained
    route of any4.load)."""
    import shutil

    from any4 import integrity

    out = tmp_path / "sharded"
    any4.save(quantized, out, max_shard_size=20_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2
    listed = json.loads((out / "any4.json").read_text())["files"]
    for name in shards:
        assert listed[name] == integrity.verify_file(out / name)["digest"]
    report = any4.io.verify(out)
    assert report["sha256"] == integrity.checkpoint_digest(out)[0]
    ids = random_ids(8, seed=2)
    torch.testing.assert_close(
        outputs(any4.load(out), ids), outputs(quantized, ids), rtol=0, atol=0
    )

    def edited(name, edit):
        d = tmp_path / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(out, d)
        edit(d)
        return d

    def flip(d):
        f = d / shards[1]
        raw = bytearray(f.read_bytes())
        raw[len(raw) - 3] ^= 0x01
        f.write_bytes(bytes(raw))

    def regroup_config(d):
        cfg = json.loads((d / "config.json").read_text())
        layer = next(iter(cfg["quantization_config"]["layers"].values()))
        layer["group_size"] = 16
        (d / "config.json").write_text(json.dumps(cfg))

    def drop_listed_digest(d):
        meta = json.loads((d / "any4.json").read_text())
        meta["files"][shards[0]] = "sha256:" + "0" * 64
        (d / "any4.json").write_text(json.dumps(meta))

    for name, edit, match in (
        ("flip", flip, "digest"),
        ("config", regroup_config, "group_size"),
        ("listed", drop_listed_digest, "digest listed"),
    ):
        d = edited(name, edit)
        with pytest.raises(Any4FormatError, match=match):
            any4.io.verify(d)
        with pytest.raises(Any4FormatError, match=match):
            any4.load(d)
        with pytest.raises(Any4FormatError, match=match):
            any4.load(d, model=tiny_llama())


def test_from_pretrained_verifies_the_checkpoint(quantized, tmp_path) -> None:
    """transformers' own from_pretrained on an any4 directory goes through any4's quantizer,
    which verifies every file first: a changed byte is refused, not loaded."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ckpt"
    any4.save(quantized, out, max_shard_size=30_000)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    shard.write_bytes(bytes(raw))
    with pytest.raises(Any4FormatError, match="digest"):
        AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
