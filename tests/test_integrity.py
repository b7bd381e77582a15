"""any4.integrity: sealed safetensors files (one digest over every byte) and checkpoint hashes."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from any4 import integrity as I  # noqa: E402


def _tensors(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w.packed": torch.randint(0, 256, (3, 5), dtype=torch.uint8, generator=g),
        "w.lut": torch.randn(3, 16, generator=g).bfloat16(),
        "w.scales": torch.randn(3, 1, 2, generator=g).half(),
        "emb": torch.randn(4, 3, generator=g),
        "ids": torch.arange(5, dtype=torch.int64),
        "flag": torch.tensor(True),
        "empty": torch.empty(0, 3),
    }


def test_round_trip_is_plain_safetensors(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    t = _tensors()
    digest = I.write_file(path, t, {"format_version": 2, "layers": {"w": {"group_size": 8}}})
    assert digest.startswith("sha256:") and len(digest) == 71
    loaded = load_file(path)  # the standard reader accepts it
    assert loaded.keys() == t.keys()
    for k in t:
        assert loaded[k].dtype == t[k].dtype and torch.equal(loaded[k], t[k])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["any4"])["digest"] == digest
    doc = I.verify_file(path)
    assert doc["digest"] == digest and doc["layers"] == {"w": {"group_size": 8}}
    sealed = I.read_file(path)
    assert sealed.verified and sealed.any4 == doc
    for k in t:
        assert torch.equal(sealed.tensors[k], t[k])
    # Deterministic: the same input gives the same bytes (whatever the dict order).
    path2 = tmp_path / "m2.safetensors"
    assert I.write_file(path2, dict(reversed(list(t.items()))), doc) == digest
    assert path.read_bytes() == path2.read_bytes()


def test_every_single_byte_change_is_refused(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    I.write_file(path, _tensors(), {"format_version": 2})
    data = path.read_bytes()
    refused = 0
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x80 if i % 2 else 0x01  # the highest or lowest bit of every byte
        path.write_bytes(bytes(bad))
        with pytest.raises(I.Any4FormatError):
            I.verify_file(path)
        if i % 5 == 0:
            with pytest.raises(I.Any4FormatError):
                I.read_file(path)
        refused += 1
    assert refused == len(data) > 500
    path.write_bytes(data)
    I.verify_file(path)


def test_truncated_or_extended_is_refused(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    I.write_file(path, _tensors(), {})
    data = path.read_bytes()
    for cut in (0, 3, 8, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(I.Any4FormatError):
            I.read_file(path)
    path.write_bytes(data + b"\0")
    with pytest.raises(I.Any4FormatError, match="trailing"):
        I.verify_file(path)


def _rewrite_header(path, edit) -> None:
    """Re-serialise the header after ``edit(header)``, keeping the data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["emb"].update(dtype="I32"),  # same byte count, different meaning
        lambda h: h["emb"].update(shape=[3, 4]),
        lambda h: h["w.lut"].update(dtype="F16"),
        lambda h: h.__setitem__("__metadata__", {**h["__metadata__"], "extra": "1"}),
        lambda h: h["__metadata__"].update(
            any4=h["__metadata__"]["any4"].replace('"group_size": 8', '"group_size": 16')
        ),
    ],
    ids=["dtype", "shape", "lut-dtype", "new-metadata", "layer-setting"],
)
def test_semantic_header_edits_are_refused(tmp_path, edit) -> None:
    path = tmp_path / "m.safetensors"
    I.write_file(path, _tensors(), {"layers": {"w": {"group_size": 8}}})
    _rewrite_header(path, edit)
    load_file(path)  # still a valid safetensors file: only the digest can tell
    with pytest.raises(I.Any4FormatError, match="does not match its digest"):
        I.verify_file(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h["emb"].update(data_offsets=[0, 4]), "needs"),
        (lambda h: h["emb"].update(dtype="X9"), "unknown dtype"),
        (lambda h: h["emb"].update(shape=[-1, 3]), "bad shape"),
        (lambda h: h["emb"].update(shape=[True, 3]), "bad shape"),
        (lambda h: h.pop("__metadata__"), "no header metadata"),
        (lambda h: h["__metadata__"].pop("any4"), "no any4 metadata"),
        (lambda h: h["__metadata__"].update(any4="{"), "corrupt any4 metadata"),
        (lambda h: h["__metadata__"].update(any4='{"digest": "md5:1"}'), "malformed digest"),
        (lambda h: h["__metadata__"].update(any4="{}"), "no digest"),
    ],
)
def test_structural_damage_names_the_problem(tmp_path, edit, match) -> None:
    path = tmp_path / "m.safetensors"
    I.write_file(path, _tensors(), {})
    _rewrite_header(path, edit)
    with pytest.raises(I.Any4FormatError, match=match):
        I.verify_file(path)


def test_seal_a_file_written_by_safetensors(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    t = _tensors(1)
    save_file(t, path, metadata={"format": "pt", "any4": I.metadata_text({"v": 2})})
    with pytest.raises(I.Any4FormatError, match="digest"):
        I.verify_file(path)  # the placeholder is not a valid digest of the file
    digest = I.seal_file(path)
    assert I.verify_file(path)["digest"] == digest
    assert I.is_sealed(path)
    with pytest.raises(ValueError, match="already sealed"):
        I.seal_file(path)
    sealed = I.read_file(path)
    for k in t:
        assert torch.equal(sealed.tensors[k], t[k])


def test_unsealed_files(tmp_path) -> None:
    path = tmp_path / "v1.safetensors"
    save_file({"a": torch.ones(2)}, path, metadata={"any4": json.dumps({"format_version": 1})})
    assert not I.is_sealed(path)
    with pytest.raises(I.Any4FormatError, match="no digest"):
        I.read_file(path)
    f = I.read_file(path, require_digest=False)
    assert not f.verified and torch.equal(f.tensors["a"], torch.ones(2))
    save_file({"a": torch.ones(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(I.Any4FormatError, match="not written by any4"):
        I.read_file(tmp_path / "foreign.safetensors", require_digest=False)


def test_write_file_rejects_bad_input(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="torch tensor"):
        I.write_file(path, {"a": [1, 2]}, {})
    with pytest.raises(TypeError, match="names must be str"):
        I.write_file(path, {1: torch.ones(1)}, {})
    with pytest.raises(TypeError, match="complex|cannot be stored"):
        I.write_file(path, {"c": torch.ones(2, dtype=torch.complex64)}, {})
    with pytest.raises(ValueError, match="reserved"):
        I.write_file(path, {"a": torch.ones(1)}, {}, metadata={"any4": "x"})
    assert os.listdir(tmp_path) == []


def test_checkpoint_digest_is_sha256sum_of_the_manifest(tmp_path) -> None:
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("c")
    (tmp_path / f".x.h.1.z{I.TEMP_SUFFIX}").write_text("left by a kill")
    digest, manifest = I.checkpoint_digest(tmp_path)
    sums = {
        rel: hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
        for rel in ("a.bin", "b.json", "sub/c.txt")
    }
    assert manifest == sorted(sums.items())
    text = "".join(f"{h}  {rel}\n" for rel, h in sorted(sums.items()))
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "b.json").write_text("{ }")
    assert I.checkpoint_digest(tmp_path)[0] != digest
    with pytest.raises(FileNotFoundError):
        I.checkpoint_digest(tmp_path / "missing")
