"""Gallery persistence: round trips for every dtype, files readable by safetensors.numpy
alone, atomic saves (a killed writer leaves a loadable file), and fault injection:
truncation, flipped bytes, wrong version, wrong shapes, foreign files."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import arcface_rs as afr

DTYPES = ["float32", "float16", "bfloat16", "int8"]


def gallery(dtype, n=300, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    g = afr.Gallery(dim, dtype)
    g.add(rng.standard_normal((n, dim)), ids=rng.permutation(10 * n)[:n])
    g.remove(g.ids()[::7])
    return g


def assert_same(a, b):
    assert (a.dim, a.dtype, len(a)) == (b.dim, b.dtype, len(b))
    np.testing.assert_array_equal(a.ids(), b.ids())
    np.testing.assert_array_equal(a.vectors(), b.vectors())


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip(tmp_path, dtype):
    g = gallery(dtype)
    path = tmp_path / "g.safetensors"
    g.save(path)
    back = afr.Gallery.load(path)
    assert_same(g, back)
    q = np.random.default_rng(1).standard_normal((12, 24))
    for got, want in zip(back.search(q, 5), g.search(q, 5)):
        np.testing.assert_array_equal(got, want)
    # automatic ids continue where the saved gallery would have
    assert back.add(np.ones(24))[0] == g.add(np.ones(24))[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_gallery_round_trips(tmp_path, dtype):
    g = afr.Gallery(5, dtype)
    g.save(tmp_path / "e.safetensors")
    back = afr.Gallery.load(tmp_path / "e.safetensors")
    assert len(back) == 0 and back.dim == 5 and back.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_readable_by_safetensors_numpy_alone(tmp_path, dtype):
    g = gallery(dtype)
    path = tmp_path / "g.safetensors"
    g.save(path)
    tensors = load_file(str(path))
    np.testing.assert_array_equal(tensors["ids"], g.ids())
    v = tensors["vectors"]
    assert v.shape == (len(g), g.dim)
    if dtype == "int8":
        assert v.dtype == np.int8
        rows = v.astype(np.float32) * tensors["scales"][:, None]
    elif dtype == "bfloat16":
        assert v.dtype == np.uint16  # numpy has no bfloat16: the raw bits
        rows = (v.astype(np.uint32) << 16).view(np.float32)
    else:
        assert v.dtype == np.dtype(dtype)
        rows = v.astype(np.float32)
    np.testing.assert_allclose(rows, g.vectors(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-2)


def test_truncated_files_are_refused(tmp_path):
    path = tmp_path / "g.safetensors"
    gallery("float16").save(path)
    data = path.read_bytes()
    rng = np.random.default_rng(2)
    for cut in [0, 1, 7, 8, 9, len(data) - 1, *rng.integers(0, len(data), 40)]:
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a valid arcface_rs gallery file"):
            afr.Gallery.load(bad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flipped_bytes_are_refused_or_harmless(tmp_path, dtype):
    path = tmp_path / "g.safetensors"
    g = gallery(dtype, n=60)
    g.save(path)
    data = path.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    rng = np.random.default_rng(3)
    # every header byte, and a sample of the data bytes
    spots = list(range(header)) + list(rng.integers(header, len(data), 150))
    harmless = 0
    for at in spots:
        bad = bytearray(data)
        bad[at] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(bad))
        try:
            back = afr.Gallery.load(path)
        except ValueError:
            continue
        # a change that still loads may only touch insignificant header whitespace
        assert_same(back, g)
        harmless += 1
    assert harmless < len(spots) // 4


def write_foreign(path, meta, tensors):
    save_file(tensors, str(path), metadata=meta)


def write_with_crc(path, meta, tensors):
    """Writes with the CRC-32 arcface_rs records, computed here independently with zlib:
    over "dim/dtype/next_id/" and then the tensor bytes in file order."""
    write_foreign(path, meta, tensors)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    fields = [meta.get(key, "") for key in ("dim", "dtype", "next_id")]
    crc = zlib.crc32("".join(f"{v}/" for v in fields).encode())
    for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
        crc = zlib.crc32(np.ascontiguousarray(tensors[name]).tobytes(), crc)
    write_foreign(path, dict(meta, crc32=f"{crc:08x}"), tensors)


def valid_parts(dtype="float32", n=4, dim=3):
    g = afr.Gallery(dim, dtype)
    g.add(np.eye(n, dim) + 0.1)
    meta = {
        "format": "arcface_rs.gallery",
        "version": "1",
        "dim": str(dim),
        "dtype": dtype,
        "next_id": str(n),
    }
    tensors = {"ids": g.ids(), "vectors": g.vectors().astype(np.float32)}
    return meta, tensors


def test_a_file_written_by_hand_with_the_right_fields_loads(tmp_path):
    meta, tensors = valid_parts()
    write_with_crc(tmp_path / "ok.safetensors", meta, tensors)
    back = afr.Gallery.load(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(back.vectors(), tensors["vectors"])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m, t: m.update(version="2"), 'version "2".*reads version 1'),
        (lambda m, t: m.update(format="other"), "format"),
        (lambda m, t: m.pop("dim"), 'lacks "dim"'),
        (lambda m, t: m.update(dtype="float64"), "dtype"),
        (lambda m, t: m.update(dim="4"), "vectors.*expected F32 \\[4, 4\\]"),
        (lambda m, t: t.update(vectors=t["vectors"][:, :2].copy()), "expected F32 \\[4, 3\\]"),
        (lambda m, t: t.update(ids=t["ids"][:3].copy()), "expected F32 \\[3, 3\\]"),
        (lambda m, t: t.update(ids=t["ids"].astype(np.int32)), "ids.*expected I64"),
        (lambda m, t: t.update(ids=np.array([0, 1, 1, 3])), "id 1 appears twice"),
        (lambda m, t: t.update(vectors=t["vectors"] * 2), "norm.*damaged"),
        (lambda m, t: t.update(extra=np.zeros(2)), "holds 3 tensors"),
        (lambda m, t: t.pop("ids"), "holds 1 tensors"),
    ],
)
def test_wrong_version_shape_or_content_is_refused(tmp_path, change, match):
    meta, tensors = valid_parts()
    change(meta, tensors)
    write_with_crc(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(ValueError, match=match):
        afr.Gallery.load(tmp_path / "bad.safetensors")


def test_wrong_checksum_and_foreign_files_are_refused(tmp_path):
    meta, tensors = valid_parts()
    write_foreign(tmp_path / "a.safetensors", dict(meta, crc32="00000000"), tensors)
    with pytest.raises(ValueError, match="CRC-32"):
        afr.Gallery.load(tmp_path / "a.safetensors")
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="no __metadata__"):
        afr.Gallery.load(tmp_path / "b.safetensors")
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match="not a valid"):
        afr.Gallery.load(tmp_path / "c.safetensors")
    header = json.dumps({"ids": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})
    blob = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8
    (tmp_path / "d.safetensors").write_bytes(blob)
    with pytest.raises(ValueError, match="no __metadata__"):
        afr.Gallery.load(tmp_path / "d.safetensors")
    with pytest.raises(FileNotFoundError, match="no gallery file"):
        afr.Gallery.load(tmp_path / "missing.safetensors")


def test_save_errors_leave_no_file_behind(tmp_path):
    g = gallery("float32", n=10)
    target = tmp_path / "no-such-dir" / "g.safetensors"
    with pytest.raises(FileNotFoundError, match="cannot save") as info:
        g.save(target)
    assert info.value.errno == errno.ENOENT
    assert not (tmp_path / "no-such-dir").exists()


def test_a_writer_killed_mid_save_leaves_a_loadable_file(tmp_path):
    """A process saving a large gallery over the file again and again is killed at random
    moments; the file must always load, as the old or the new gallery, never a mix."""
    path = tmp_path / "g.safetensors"
    old = gallery("float32", n=50, dim=512, seed=10)
    old.save(path)
    script = textwrap.dedent(
        f"""
        import numpy as np, arcface_rs as afr
        g = afr.Gallery(512)
        g.add(np.random.default_rng(11).standard_normal((40000, 512)))
        print("ready", flush=True)
        while True:
            g.save({str(path)!r})
        """
    )
    rng = np.random.default_rng(12)
    seen_new = False
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
            try:
                proc.wait(timeout=float(rng.uniform(0.05, 0.6)))
            except subprocess.TimeoutExpired:
                pass
        finally:
            proc.kill()
            proc.wait()
        back = afr.Gallery.load(path)
        if len(back) == len(old):
            assert_same(back, old)
        else:
            assert len(back) == 40000
            seen_new = True
    assert seen_new or len(afr.Gallery.load(path)) == len(old)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mmap_load_searches_in_place_and_copies_on_change(tmp_path, dtype):
    g = gallery(dtype)
    path = tmp_path / "g.safetensors"
    g.save(path)
    m = afr.Gallery.load(path, mmap=True)
    assert m.mapped and "mapped" in repr(m) and not g.mapped
    assert_same(m, g)
    q = np.random.default_rng(4).standard_normal((20, 24))
    for got, want in zip(m.search(q, 5), g.search(q, 5)):
        np.testing.assert_array_equal(got, want)
    gallery(dtype, seed=9).save(path)  # replacing the file leaves the mapped gallery intact
    assert_same(m, g)
    m.add(np.ones(24))
    assert not m.mapped and len(m) == len(g) + 1
    assert_same(afr.Gallery.load(path), gallery(dtype, seed=9))


def test_mmap_load_refuses_damaged_files_too(tmp_path):
    path = tmp_path / "g.safetensors"
    gallery("float32").save(path)
    data = path.read_bytes()
    for cut in (3, 100, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a valid arcface_rs gallery file"):
            afr.Gallery.load(path, mmap=True)


def test_file_system_failures_raise_the_matching_oserror(tmp_path):
    g = gallery("float32", n=4)
    with pytest.raises(IsADirectoryError) as info:
        afr.Gallery.load(tmp_path)
    assert info.value.errno == errno.EISDIR
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        g.save(blocker / "g.safetensors")
    for mmap in (False, True):  # the core's own mapping, without the Python-side check
        with pytest.raises(FileNotFoundError) as info:
            afr._core.Gallery.load(str(tmp_path / "missing"), mmap)
        assert info.value.errno == errno.ENOENT


def test_damaged_and_foreign_files_raise_gallery_file_error(tmp_path):
    path = tmp_path / "g.safetensors"
    gallery("int8", n=20).save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    for mmap in (False, True):
        with pytest.raises(afr.GalleryFileError, match="CRC-32"):
            afr.Gallery.load(path, mmap=mmap)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(foreign))
    with pytest.raises(afr.GalleryFileError, match="not a valid"):
        afr.Gallery.load(foreign)
    assert issubclass(afr.GalleryFileError, ValueError)


# ---------------------------------------------------------------------------------------
# Files as untrusted input (hostile testing, round three).


def _zero_row_file(path, dim: int) -> None:
    """A 0-row gallery file claiming ``dim``, with a valid CRC: written as save() would."""
    import json
    import struct
    import zlib

    meta = {
        "format": "arcface_rs.gallery",
        "version": "1",
        "dim": str(dim),
        "dtype": "float32",
        "next_id": "0",
        "crc32": f"{zlib.crc32(f'{dim}/float32/0/'.encode()):08x}",
    }
    header = {
        "__metadata__": meta,
        "ids": {"dtype": "I64", "shape": [0], "data_offsets": [0, 0]},
        "vectors": {"dtype": "F32", "shape": [0, dim], "data_offsets": [0, 0]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_file_claiming_a_huge_dim_is_refused_not_a_segfault(tmp_path, mmap, run_isolated):
    path = tmp_path / "huge.safetensors"
    _zero_row_file(path, 2**62)
    ok = tmp_path / "ok.safetensors"
    _zero_row_file(ok, 8)  # the same writer with a sane dim loads: the file is well formed
    assert afr.Gallery.load(ok).dim == 8
    out = run_isolated(
        f"""
        import arcface_rs as afr
        try:
            g = afr.Gallery.load({str(path)!r}, mmap={mmap})
        except afr.GalleryFileError as e:
            assert "dim" in str(e), e
            print("refused")
        else:
            g.snapshot()
            print("loaded")
        """
    )
    assert out.returncode == 0 and "refused" in out.stdout, (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
@pytest.mark.parametrize("mmap", [False, True])
def test_devices_are_refused_before_reading(device, mmap, run_isolated):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist here")
    out = run_isolated(
        f"""
        import arcface_rs as afr
        try:
            afr.Gallery.load({device!r}, mmap={mmap})
        except afr.GalleryFileError as e:
            assert "not a regular file" in str(e), e
            print("refused")
        """,
        timeout=60,
    )
    assert out.returncode == 0 and "refused" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_a_fifo_without_a_writer_is_refused_not_waited_on(tmp_path, run_isolated):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = run_isolated(
        f"""
        import arcface_rs as afr
        for mmap in (False, True):
            try:
                afr.Gallery.load({str(fifo)!r}, mmap=mmap)
            except afr.GalleryFileError as e:
                assert "not a regular file" in str(e), e
        print("refused")
        """,
        timeout=60,
    )
    assert out.returncode == 0 and "refused" in out.stdout, (out.returncode, out.stderr[-2000:])


def test_symlink_loops_and_nul_bytes_are_named_as_such(tmp_path):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(OSError) as info:
        afr.Gallery.load(loop)
    assert info.value.errno == errno.ELOOP
    assert not isinstance(info.value, FileNotFoundError)
    with pytest.raises(ValueError, match="NUL"):
        afr.Gallery.load(str(tmp_path / "a\0b"))


def test_save_over_a_mapped_gallery_keeps_it_readable(tmp_path):
    path = tmp_path / "g.safetensors"
    rng = np.random.default_rng(7)
    g = afr.Gallery(16)
    g.add(rng.standard_normal((100, 16)))
    g.save(path)
    mapped = afr.Gallery.load(path, mmap=True)
    before = mapped.search(rng.standard_normal((2, 16)), k=4)
    afr.Gallery(16).save(path)  # an empty gallery replaces the file
    after = mapped.search(rng.standard_normal((2, 16)), k=4)
    assert after[1].shape == before[1].shape and (after[1] >= 0).all()
    assert len(afr.Gallery.load(path)) == 0


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    path = tmp_path / "g.safetensors"
    # a pid that cannot exist (beyond pid_max) and our own (a save that may be in progress)
    stale = tmp_path / "g.safetensors.tmp-4194305-0"
    ours = tmp_path / f"g.safetensors.tmp-{os.getpid()}-99"
    other = tmp_path / "other.safetensors.tmp-4194305-0"
    for f in (stale, ours, other):
        f.write_bytes(b"x" * 1000)
    g = afr.Gallery(4)
    g.add(np.eye(4))
    g.save(path)
    assert not stale.exists() and ours.exists() and other.exists()
