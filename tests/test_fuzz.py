"""Fuzz targets for the fitcli command line (hypothesis), all through the real entry point
``fitcli.cli.main(argv)`` in-process, cwd = repository root:

1. mutated safetensors checkpoints  -> ``fitcli inspect`` exits 0 or 3
2. mutated torch.save (.pt) zips     -> exits 0 or 3
3. hostile pickles (raw and in zips) -> exit 3, and nothing in them ever runs
4. spec strings for every option that takes one (--data, --arch, --arch-kwargs, --units, --layer,
   --metric, --loss, --tau, --batch-size, and the MODEL path) -> 0, 2, 3 (4 only with a specific
   message); callables that are not factories (os:system, sys:exit, ...) must be exit 3
5. TOML config files (--config, and found by discovery from the cwd) -> 0, 2, 3

Everywhere: no traceback, no "unexpected ..." catch-all message, a non-zero exit explains itself
in one or two lines starting 'fitcli: error:' (click's own usage errors aside), every input ends
within FITCLI_FUZZ_TIMEOUT seconds. FITCLI_FUZZ_EXAMPLES is the total number of inputs over all
targets (``make fuzz``: 10000); see ``fuzz_helpers.py``. ``test_zz_summary`` prints the session's
one-line summary (run with -s, or set FITCLI_FUZZ_SUMMARY=path) and fails if anything crashed.

A failing case prints its exact input: the argv, and for a mutated file the list of mutation ops
(``apply_st_ops`` / ``apply_pt_ops`` below replay them) plus the file itself, saved under
FITCLI_FUZZ_CRASH_DIR.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import runpy
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import fuzz_helpers as fh
import pytest
from fuzz_helpers import REPO, argv_safe, fuzz_settings, record, run_cli, spec_is_safe
from hypothesis import assume, example, given
from hypothesis import strategies as st

MLP_ST = "sample_models/mlp.safetensors"
MLP_ARCH = "sample_models/models.py:mlp"
MLP_DATA = "sample_models/mlp_data.safetensors"
ST_BASE = (REPO / MLP_ST).read_bytes()
ST_HDR_LEN = int.from_bytes(ST_BASE[:8], "little")


def _repo_snapshot() -> dict[str, tuple[int, int]]:
    """Size and mtime of every file in the repository outside .venv/.git/caches/tests."""
    skip = {".venv", ".git", ".pytest_cache", ".ruff_cache", ".hypothesis", "tests", "__pycache__"}
    snap = {}
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for f in filenames:
            st_ = os.stat(os.path.join(dirpath, f))
            snap[os.path.relpath(os.path.join(dirpath, f), REPO)] = (st_.st_size, st_.st_mtime_ns)
    return snap


_SNAPSHOT: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _repo_cwd():
    """The CLI runs with cwd = repository root (truth.json paths are relative to it)."""
    _SNAPSHOT.update(_repo_snapshot())
    old_cwd = os.getcwd()
    old_verbose = os.environ.pop("FITCLI_VERBOSE", None)
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if old_verbose is not None:
            os.environ["FITCLI_VERBOSE"] = old_verbose


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------
# shared string strategies

NO_NUL_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                      max_size=30)
SPEC_TEXT = st.text(alphabet="abcfmopsxyz0129_.:/\\-=, *?[]!{}\"'~\n\t", max_size=30)
SURROGATE_TEXT = st.text(alphabet=st.sampled_from([chr(c) for c in range(0xDC80, 0xDD00, 7)] + list("ab:.x")),
                         min_size=1, max_size=10)  # what Python makes of non-UTF-8 argv bytes
LONG_TEXT = st.builds(lambda s, n: (s * n)[:n], st.text(alphabet="ab:x9,-[{", min_size=1, max_size=3),
                      st.integers(1000, 120000))


def mutated(curated: list[str]) -> st.SearchStrategy[str]:
    """A curated string with one character inserted, deleted or replaced."""

    @st.composite
    def build(draw):
        s = draw(st.sampled_from(curated))
        i = draw(st.integers(0, len(s)))
        op = draw(st.sampled_from(["ins", "del", "rep", "dup"]))
        c = draw(st.sampled_from(list(":,x=-./ 0 9\\n") + ["é", "\t", "\u2028", "٣"]))
        if op == "ins":
            return s[:i] + c + s[i:]
        if op == "del":
            return s[:i] + s[i + 1:]
        if op == "rep":
            return s[:i] + c + s[i + 1:]
        return s + s

    return build()


def spec_values(curated: list[str], extra: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    parts = [st.sampled_from(curated), mutated(curated), SPEC_TEXT, NO_NUL_TEXT, SURROGATE_TEXT, LONG_TEXT]
    if extra is not None:
        parts.insert(1, extra)
    return st.one_of(*parts)


# =============================================================================================
# 1. safetensors mutations

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
          "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64", "f32", "", "float32", 32, None, ["F32"]]
BIG = [0, 1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -(2**63)]


def _st_split(data: bytes):
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        return None
    try:
        hdr = json.loads(data[8:8 + n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return hdr, data[8 + n:]


def _st_join(hdr, body: bytes, pad: int) -> bytes:
    raw = json.dumps(hdr, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    raw += b" " * pad
    return len(raw).to_bytes(8, "little") + raw + body


def _numel(shape) -> int | None:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n


def _json_edit(hdr, edit):
    field, value = edit[0], edit[1]
    if field == "root":
        return value
    if not isinstance(hdr, dict):
        return hdr
    if field == "meta":
        hdr["__metadata__"] = value
        return hdr
    names = sorted(k for k in hdr if k != "__metadata__")
    if field == "add":
        hdr[value[0]] = value[1]
        return hdr
    if not names:
        return hdr
    name = names[edit[2] % len(names)]
    entry = hdr[name]
    if field == "drop":
        del hdr[name]
    elif field == "rename":
        hdr[value] = hdr.pop(name)
    elif field == "entry":
        hdr[name] = value
    elif isinstance(entry, dict):
        if field in ("dtype", "shape", "data_offsets"):
            entry[field] = value
        elif field == "drop_field":
            entry.pop(value, None)
        elif field == "extra":
            entry[value[0]] = value[1]
        elif field == "reshape":  # same numel, another shape (a file that still parses)
            n = _numel(entry.get("shape"))
            if n is not None and n > 0:
                shapes = [[n], [1, n], [n, 1], [1, 1, 1, 1, 1, 1, 1, n]] + [[a, n // a] for a in range(2, n) if n % a == 0]
                if n == 1:
                    shapes.append([])
                entry["shape"] = shapes[value % len(shapes)]
        elif field == "empty":  # zero-size tensor: shape [0, ...], no bytes
            off = entry.get("data_offsets")
            a = off[0] if isinstance(off, list) and off else 0
            shape = entry.get("shape") if isinstance(entry.get("shape"), list) else [1]
            entry["shape"] = [0] + list(shape[1:]) if value else list(shape[:-1]) + [0]
            entry["data_offsets"] = [a, a]
        elif field == "retype":  # another dtype, last dim scaled so the byte count still fits
            size = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                    "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
            new = value
            shape = entry.get("shape")
            if entry.get("dtype") in size and new in size and isinstance(shape, list) and shape \
                    and all(isinstance(d, int) for d in shape):
                old_b, new_b = size[entry["dtype"]], size[new]
                last = shape[-1] * old_b
                if last % new_b == 0:
                    entry["dtype"] = new
                    entry["shape"] = list(shape[:-1]) + [last // new_b]
    return hdr


def apply_st_ops(base: bytes, ops: list[tuple]) -> bytes:
    """Replay a list of mutation ops on the bytes of a safetensors file (deterministic)."""
    data = bytearray(base)
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif kind == "flip" and data:
            data[op[1] % len(data)] ^= 1 << op[2]
        elif kind == "set" and data:
            data[op[1] % len(data)] = op[2]
        elif kind == "hdrlen":
            data[:8] = (op[1] % 2**64).to_bytes(8, "little")
        elif kind == "splice":
            i = op[1] % (len(data) + 1)
            data[i:i + op[3]] = op[2]
        elif kind == "json":  # edit the parsed header, re-serialise (length prefix recomputed)
            parsed = _st_split(bytes(data))
            if parsed is not None:
                hdr, body = parsed
                data = bytearray(_st_join(_json_edit(hdr, op[1:]), body, 0))
    return bytes(data)


def _region_offset(regions: dict[str, tuple[int, int]]):
    return st.sampled_from(sorted(regions)).flatmap(lambda r: st.integers(*regions[r]))


ST_REGIONS = {"prefix": (0, 7), "header": (8, 8 + ST_HDR_LEN - 1), "header_start": (8, 40),
              "header_end": (8 + ST_HDR_LEN - 24, 8 + ST_HDR_LEN + 8), "body": (8 + ST_HDR_LEN, len(ST_BASE) - 1)}
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(BIG), st.text(max_size=8),
                         st.floats(allow_nan=False))
SPLICE_BYTES = st.one_of(st.binary(max_size=48), st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"', b",", b":", b"null", b"1e999", b"-", b"\\u0000", b"\\ud800", b"\xff\xfe",
     b"\xc0\x80", b"\x00" * 8, b" " * 64, b'"__metadata__":{"a":1},', b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}']))

st_ops = st.one_of(
    st.tuples(st.just("truncate"), st.one_of(st.integers(0, len(ST_BASE)), st.sampled_from(
        [0, 1, 7, 8, 9, 8 + ST_HDR_LEN - 1, 8 + ST_HDR_LEN, 8 + ST_HDR_LEN + 1, len(ST_BASE) - 1]))),
    st.tuples(st.just("flip"), _region_offset(ST_REGIONS), st.integers(0, 7)),
    st.tuples(st.just("set"), _region_offset(ST_REGIONS), st.sampled_from([0, 0x20, 0x22, 0x7B, 0x7D, 0x80, 0xFF])
              | st.integers(0, 255)),
    st.tuples(st.just("hdrlen"), st.one_of(st.integers(0, 2 * len(ST_BASE)), st.sampled_from(
        [0, 1, 2, 7, 8, ST_HDR_LEN - 1, ST_HDR_LEN + 1, ST_HDR_LEN + 8, len(ST_BASE), 100_000_000, 100_000_001,
         2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]))),
    st.tuples(st.just("splice"), _region_offset(ST_REGIONS), SPLICE_BYTES, st.integers(0, 16)),
    st.tuples(st.just("json"), st.just("dtype"), st.sampled_from(DTYPES), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("shape"), st.one_of(
        st.lists(st.one_of(st.integers(-2, 40), st.sampled_from(BIG)), max_size=7),
        st.sampled_from(["32", [32.0], None, [[32]], [True], {}])), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("data_offsets"), st.one_of(
        st.lists(st.one_of(st.integers(0, len(ST_BASE)), st.sampled_from(BIG + [128, 2048, 2176])), max_size=3),
        st.sampled_from(["0,128", None, [0.0, 128.0], {}])), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("reshape"), st.integers(0, 50), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("retype"), st.sampled_from(
        ["F64", "I64", "U64", "F32", "I32", "U32", "F16", "BF16", "I16", "U16", "I8", "U8", "BOOL", "F8_E4M3",
         "F8_E5M2"]), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("empty"), st.booleans(), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("drop"), st.none(), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("drop_field"), st.sampled_from(["dtype", "shape", "data_offsets"]),
              st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("rename"), st.one_of(st.text(max_size=12), st.sampled_from(
        ["fc1.weight", "", "__metadata__", "a" * 5000, "fc1.weight.", ".", "fc1..weight", "fc4.weight",
         "fc1.weight\n", "fc1.wéight"])), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("entry"), st.sampled_from([None, 5, "x", [], {}, {"dtype": "F32"}, [1, 2]]),
              st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("extra"), st.tuples(st.text(max_size=6), JSON_SCALARS), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("meta"), st.one_of(
        st.dictionaries(st.text(max_size=5), st.one_of(st.text(max_size=5), JSON_SCALARS,
                                                      st.lists(st.integers(), max_size=2)), max_size=3),
        JSON_SCALARS), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("add"), st.tuples(st.text(max_size=10), st.one_of(
        st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": st.lists(st.integers(0, 4), max_size=3),
                               "data_offsets": st.lists(st.integers(0, 2200), min_size=2, max_size=2)}),
        JSON_SCALARS)), st.integers(0, 9)),
    st.tuples(st.just("json"), st.just("root"), st.sampled_from([[], "x", 5, None, {}, [1, 2], {"": {}}]),
              st.integers(0, 9)),
)


def test_safetensors_mutations(work):
    path = work / "m.safetensors"

    @fuzz_settings("safetensors")
    @given(ops=st.lists(st_ops, min_size=1, max_size=4), use_arch=st.booleans(),
           fmt=st.sampled_from([None, None, "json", "csv"]))
    @example(ops=[("truncate", 0)], use_arch=False, fmt=None)
    @example(ops=[("truncate", 7)], use_arch=False, fmt=None)
    @example(ops=[("hdrlen", 2**64 - 1)], use_arch=False, fmt=None)
    @example(ops=[("hdrlen", 0)], use_arch=True, fmt=None)
    @example(ops=[("json", "root", {}, 0)], use_arch=False, fmt=None)
    @example(ops=[("json", "reshape", 0, 1)], use_arch=False, fmt="json")
    @example(ops=[("json", "reshape", 0, 1)], use_arch=True, fmt=None)
    @example(ops=[("json", "retype", "BOOL", 1)], use_arch=False, fmt=None)
    @example(ops=[("json", "retype", "I64", 1)], use_arch=True, fmt=None)
    @example(ops=[("json", "empty", True, 1)], use_arch=False, fmt=None)
    @example(ops=[("json", "dtype", "F8_E4M3", 0)], use_arch=False, fmt=None)
    @example(ops=[("json", "shape", [2**63, 2**63], 1)], use_arch=False, fmt=None)
    @example(ops=[("json", "data_offsets", [0, 2**64 - 1], 1)], use_arch=False, fmt=None)
    @example(ops=[("json", "meta", {"format": 5}, 0)], use_arch=False, fmt=None)
    def inner(ops, use_arch, fmt):
        data = apply_st_ops(ST_BASE, ops)
        path.write_bytes(data)
        argv = ["inspect", str(path)] + (["--arch", MLP_ARCH] if use_arch else []) + (["--format", fmt] if fmt else [])
        o = run_cli(argv)
        record("safetensors", argv, o, {0, 3}, f"apply_st_ops(<{MLP_ST} bytes>, {ops!r})",
               files={"input.safetensors": data})

    inner()
    fh.check_no_failures("safetensors")


# =============================================================================================
# 2. torch.save (.pt zip) mutations

_PT: dict = {}


def _pt_base(work: Path) -> tuple[bytes, list[str]]:
    """A state-dict .pt of the mlp sample, written once per session with torch.save."""
    if "bytes" not in _PT:
        import torch
        from safetensors.torch import load_file

        p = work / "mlp_state_dict.pt"
        torch.save(load_file(str(REPO / MLP_ST)), p)
        _PT["bytes"] = p.read_bytes()
        with zipfile.ZipFile(p) as z:
            _PT["names"] = z.namelist()
            _PT["members"] = {n: z.read(n) for n in _PT["names"]}
            infos = z.infolist()
        pkl = next(i for i in infos if i.filename.endswith("data.pkl"))
        start = pkl.header_offset + 30 + len(pkl.filename)
        _PT["regions"] = {
            "local_header": (0, 80), "data_pkl": (start, start + pkl.file_size - 1),
            "records": (start + pkl.file_size, max(i.header_offset for i in infos)),
            "central_dir": (max(i.header_offset for i in infos) + 30, len(_PT["bytes"]) - 23),
            "eocd": (len(_PT["bytes"]) - 22, len(_PT["bytes"]) - 1),
        }
    return _PT["bytes"], _PT["names"]


def _rezip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _pickle_ops(data: bytes):
    try:
        return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]
    except Exception:  # not parseable (already mutated): no structured edit
        return None


def _enc_int(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8 or 1, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _edit_pickle(data: bytes, what: str, k: int, value) -> bytes:
    """Replace the k-th int / string / GLOBAL argument of a pickle with ``value``."""
    ops = _pickle_ops(data)
    if not ops:
        return data
    kinds = {"int": ("BININT1", "BININT2", "BININT", "LONG1"), "str": ("BINUNICODE", "SHORT_BINUNICODE"),
             "global": ("GLOBAL",)}[what]
    hits = [i for i, (name, _, _) in enumerate(ops) if name in kinds]
    if not hits:
        return data
    i = hits[k % len(hits)]
    start = ops[i][2]
    end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
    if what == "int":
        new = _enc_int(value)
    elif what == "str":
        raw = value.encode("utf-8", "surrogatepass")
        new = b"X" + struct.pack("<I", len(raw)) + raw
    else:
        new = b"c" + value.encode() + b"\n"
    return data[:start] + new + data[end:]


def apply_pt_ops(base: bytes, members: dict[str, bytes], ops: list[tuple]) -> bytes:
    """Replay mutation ops on a torch.save zip (deterministic). 'zip' ops rebuild the archive from
    edited members, so CRCs and offsets are valid and the edit reaches torch's unpickler."""
    data = bytearray(base)
    for op in ops:
        kind = op[0]
        if kind == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif kind == "flip" and data:
            data[op[1] % len(data)] ^= 1 << op[2]
        elif kind == "set" and data:
            data[op[1] % len(data)] = op[2]
        elif kind == "splice":
            i = op[1] % (len(data) + 1)
            data[i:i + op[3]] = op[2]
        elif kind == "zip":
            try:
                with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
                    cur = {n: z.read(n) for n in z.namelist()}
            except Exception:
                cur = dict(members)
            names = list(cur)
            if not names:
                continue
            name = names[op[2] % len(names)] if op[1] != "pkl" else next(
                (n for n in names if n.endswith("data.pkl")), names[0])
            edit, arg = op[3], op[4]
            blob = cur[name]
            if edit == "drop":
                del cur[name]
            elif edit == "truncate":
                cur[name] = blob[: arg % (len(blob) + 1)]
            elif edit == "flip" and blob:
                b = bytearray(blob)
                b[arg[0] % len(b)] ^= 1 << arg[1]
                cur[name] = bytes(b)
            elif edit == "set" and blob:
                b = bytearray(blob)
                b[arg[0] % len(b)] = arg[1]
                cur[name] = bytes(b)
            elif edit == "replace":
                cur[name] = arg
            elif edit == "rename":
                cur[arg] = cur.pop(name)
            elif edit in ("int", "str", "global"):
                cur[name] = _edit_pickle(blob, edit, arg[0], arg[1])
            data = bytearray(_rezip(cur))
    return bytes(data)


def pt_ops(regions: dict) -> st.SearchStrategy:
    member_edit = st.one_of(
        st.tuples(st.just("drop"), st.none()),
        st.tuples(st.just("truncate"), st.integers(0, 600)),
        st.tuples(st.just("flip"), st.tuples(st.integers(0, 4096), st.integers(0, 7))),
        st.tuples(st.just("set"), st.tuples(st.integers(0, 4096), st.integers(0, 255))),
        st.tuples(st.just("replace"), st.one_of(st.binary(max_size=16), st.sampled_from(
            [b"big", b"little", b"", b"2", b"-1", b"99999999999999999999", b"\xff", b"3\n", b"64", b"0"]))),
        st.tuples(st.just("rename"), st.sampled_from(["mlp/data.pkl", "mlp/data/9", "x/data.pkl", "mlp/code/x",
                                                      "mlp/constants.pkl", "data.pkl", "../data.pkl"])),
    )
    pkl_edit = st.one_of(
        st.tuples(st.just("int"), st.tuples(st.integers(0, 60), st.one_of(
            st.integers(-3, 2100), st.sampled_from(BIG + [2**40, 10**30])))),
        st.tuples(st.just("str"), st.tuples(st.integers(0, 30), st.one_of(st.sampled_from(
            ["cpu", "cuda", "cuda:7", "meta", "mps", "xla", "0", "9", "-1", "", "storage", "fc1.weight", "../x",
             "1" * 300]), st.text(max_size=8)))),
        st.tuples(st.just("global"), st.tuples(st.integers(0, 20), st.sampled_from(
            ["torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter", "torch FloatStorage",
             "torch HalfStorage", "torch BoolStorage", "torch LongStorage", "torch ByteStorage",
             "collections OrderedDict", "builtins set", "builtins dict", "torch Size", "torch.nn.modules.linear Linear",
             "torch._tensor _rebuild_from_type_v2", "torch device", "torch._utils _rebuild_sparse_tensor",
             "torch._utils _rebuild_wrapper_subclass", "os system", "posix system", "builtins eval", "nosuchmod x",
             "torch._utils _rebuild_qtensor", "torch._utils _rebuild_meta_tensor_no_storage"]))),
    )
    return st.one_of(
        st.tuples(st.just("truncate"), st.integers(0, 10000)),
        st.tuples(st.just("flip"), _region_offset(regions), st.integers(0, 7)),
        st.tuples(st.just("set"), _region_offset(regions), st.integers(0, 255)),
        st.tuples(st.just("splice"), _region_offset(regions), SPLICE_BYTES, st.integers(0, 16)),
        st.tuples(st.just("zip"), st.just("any"), st.integers(0, 20)).flatmap(
            lambda t: member_edit.map(lambda e: (*t, *e))),
        st.tuples(st.just("zip"), st.just("pkl"), st.just(0)).flatmap(
            lambda t: st.one_of(pkl_edit, member_edit).map(lambda e: (*t, *e))),
    )


def test_pt_mutations(work):
    base, _names = _pt_base(work)
    members = _PT["members"]
    path = work / "m.pt"

    @fuzz_settings("pt")
    @given(ops=st.lists(pt_ops(_PT["regions"]), min_size=1, max_size=3), use_arch=st.booleans())
    @example(ops=[("truncate", 100)], use_arch=False)
    @example(ops=[("zip", "pkl", 0, "int", (3, 2**40))], use_arch=False)
    @example(ops=[("zip", "pkl", 0, "int", (4, 999))], use_arch=True)
    @example(ops=[("zip", "pkl", 0, "str", (2, "meta"))], use_arch=True)
    @example(ops=[("zip", "pkl", 0, "str", (2, "cuda"))], use_arch=False)
    @example(ops=[("zip", "pkl", 0, "global", (1, "torch HalfStorage"))], use_arch=True)
    @example(ops=[("zip", "pkl", 0, "global", (1, "os system"))], use_arch=False)
    @example(ops=[("zip", "any", 3, "replace", b"big")], use_arch=True)
    @example(ops=[("zip", "pkl", 0, "rename", "mlp/constants.pkl")], use_arch=False)
    @example(ops=[("zip", "pkl", 0, "truncate", 0)], use_arch=True)  # found by make fuzz: bare EOFError
    @example(ops=[("zip", "any", 0, "truncate", 305)], use_arch=False)  # found by make fuzz: struct.error
    @example(ops=[("flip", 176, 0), ("flip", 8816, 0)], use_arch=False)  # found by make fuzz: AssertionError
    def inner(ops, use_arch):
        data = apply_pt_ops(base, members, ops)
        path.write_bytes(data)
        argv = ["inspect", str(path)] + (["--arch", MLP_ARCH] if use_arch else [])
        o = run_cli(argv)
        record("pt", argv, o, {0, 3}, f"apply_pt_ops(<torch.save(mlp state dict) bytes>, members, {ops!r})",
               files={"input.pt": data})

    inner()
    fh.check_no_failures("pt")


# =============================================================================================
# 3. hostile pickles

class _Reduce:
    """Pickles as ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _u(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


class Hostile:
    """Payloads aimed at files under ``root`` (MARKER, MARKER_IMPORT) and a marker module."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = root / "PWNED"
        self.marker_import = root / "PWNED_BY_IMPORT"
        self.mod_dir = root / "modpath"
        self.mod_name = "fitcli_fuzz_marker_mod"
        self.mod_dir.mkdir(parents=True, exist_ok=True)
        self.mod_file = self.mod_dir / f"{self.mod_name}.py"
        self.mod_file.write_text(f"open({str(self.marker_import)!r}, 'w').close()\n")

    def markers(self) -> list[Path]:
        return [self.marker, self.marker_import]

    def objects(self) -> dict[str, _Reduce]:
        m = str(self.marker)
        return {
            "system": _Reduce(os.system, (f"touch {m}",)),
            "open": _Reduce(open, (m, "w")),
            "import_antigravity": _Reduce(__import__, ("antigravity",)),
            "eval": _Reduce(eval, (f"open({m!r}, 'w').close()",)),
            "exec": _Reduce(exec, (f"import pathlib; pathlib.Path({m!r}).touch()",)),
            "runpy": _Reduce(runpy.run_path, (str(self.mod_file),)),
            "subprocess": _Reduce(subprocess.call, (["touch", m],)),
        }

    def body(self, kind: str, protocol: int = 2) -> bytes:
        """A complete pickle (PROTO ... STOP) of payload ``kind``."""
        objs = self.objects()
        if kind in objs:
            return pickle.dumps(objs[kind], protocol=protocol)
        if kind == "import_module_chain":  # sys.path.insert(0, mod_dir); importlib.import_module(mod)
            proto = b"\x80" + bytes([protocol])
            return (proto + _g("builtins", "getattr") + _g("sys", "path") + _u("insert") + b"\x86R"
                    + b"K\x00" + _u(str(self.mod_dir)) + b"\x86R0"
                    + _g("importlib", "import_module") + _u(self.mod_name) + b"\x85R.")
        raise KeyError(kind)

    def fragment(self, kind: str) -> bytes:
        """The payload without PROTO/STOP, to splice into a random opcode stream."""
        return self.body(kind, 2)[2:-1]


LIVE_KINDS = ["system", "open", "eval", "exec", "runpy", "subprocess", "import_module_chain"]
KINDS = LIVE_KINDS + ["import_antigravity"]


@pytest.fixture(scope="module")
def hostile(work) -> Hostile:
    """The payloads, after checking in a child process that each one really does its harm when
    unpickled without restriction (so 'no marker file' below means fitcli blocked it)."""
    check_root = work / "selfcheck"
    check_root.mkdir()
    h = Hostile(check_root)
    raw = check_root / "raw.pkl"
    script = textwrap.dedent("""
        import os, pickle, sys, torch
        root, kinds = sys.argv[1], sys.argv[2:]
        bad = []
        for kind in kinds:
            for fmt in ("raw", "zip"):
                for m in ("PWNED", "PWNED_BY_IMPORT"):
                    p = os.path.join(root, m)
                    if os.path.exists(p):
                        os.remove(p)
                sys.modules.pop("fitcli_fuzz_marker_mod", None)  # imported by the previous round
                path = os.path.join(root, kind + "." + fmt)
                try:
                    if fmt == "raw":
                        pickle.loads(open(path, "rb").read())
                    else:
                        torch.load(path, weights_only=False)
                except Exception:
                    pass
                if not any(os.path.exists(os.path.join(root, m)) for m in ("PWNED", "PWNED_BY_IMPORT")):
                    bad.append(kind + "." + fmt)
        print("NOT-LIVE:" + ",".join(bad))
    """)
    for kind in LIVE_KINDS:
        body = h.body(kind, 2)
        (check_root / f"{kind}.raw").write_bytes(body)
        (check_root / f"{kind}.zip").write_bytes(_rezip({**_template_zip(), "archive/data.pkl": body}))
    raw.write_text(script)
    r = subprocess.run([sys.executable, str(raw), str(check_root), *LIVE_KINDS], capture_output=True, text=True,
                       timeout=300, cwd=check_root)
    assert "NOT-LIVE:" in r.stdout, r.stderr[-2000:]
    assert r.stdout.strip().endswith("NOT-LIVE:"), f"payloads that did nothing unrestricted: {r.stdout}"
    return Hostile(work / "hostile")


_TEMPLATE: dict = {}


def _template_zip() -> dict[str, bytes]:
    """Members of a torch.save archive of a tiny state dict (data.pkl gets replaced)."""
    if not _TEMPLATE:
        import torch

        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2)}, buf)
        with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
            _TEMPLATE.update({n: z.read(n) for n in z.namelist()})
    return dict(_TEMPLATE)


GLOBAL_NAMES = [("os", "system"), ("posix", "system"), ("nt", "system"), ("subprocess", "Popen"),
                ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
                ("builtins", "open"), ("importlib", "import_module"), ("runpy", "run_path"), ("sys", "path"),
                ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"), ("collections", "OrderedDict"),
                ("torch", "Size"), ("torch._tensor", "_rebuild_from_type_v2"), ("__builtin__", "set"),
                ("copy_reg", "_reconstructor"), ("torch.nn.modules.linear", "Linear"), ("webbrowser", "open"),
                ("shutil", "rmtree"), ("pickle", "loads"), ("torch", "load"), ("numpy.core.multiarray", "_reconstruct")]

_ident = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=12)
opcode_fragment = st.one_of(
    st.sampled_from([b"(", b")", b"]", b"}", b"N", b"\x88", b"\x89", b"t", b"\x85", b"\x86", b"\x87", b"l", b"d",
                     b"a", b"e", b"s", b"u", b"R", b"b", b"\x81", b"\x94", b"0", b"1", b"2", b"Q", b"\x93", b"o",
                     b"\x97", b"\x98", b".", b"\x8f", b"\x90", b"\x91"]),
    st.builds(lambda b: b"K" + bytes([b]), st.integers(0, 255)),
    st.builds(lambda v: b"J" + struct.pack("<i", v), st.integers(-(2**31), 2**31 - 1)),
    st.builds(lambda b: b"q" + bytes([b]), st.integers(0, 8)),
    st.builds(lambda b: b"h" + bytes([b]), st.integers(0, 8)),
    st.builds(_u, st.one_of(st.text(max_size=10), st.sampled_from(["system", "touch /tmp/x", "storage", "cpu"]))),
    st.builds(lambda s: b"\x8c" + bytes([len(s)]) + s, st.binary(max_size=20)),
    st.builds(lambda s: b"C" + bytes([len(s)]) + s, st.binary(max_size=20)),
    st.builds(lambda n: b"\x95" + struct.pack("<Q", n), st.sampled_from([0, 1, 8, 2**63, 2**64 - 1])),
    st.builds(lambda n: b"\x8e" + struct.pack("<Q", n), st.sampled_from([0, 1, 2**40, 2**64 - 1])),
    st.builds(lambda n: b"B" + struct.pack("<I", n), st.sampled_from([0, 1, 2**31, 2**32 - 1])),
    st.builds(lambda mn: _g(*mn), st.sampled_from(GLOBAL_NAMES)),
    st.builds(lambda a, b: _g(a, b), _ident, _ident),
    st.builds(lambda a, b: b"i" + a.encode() + b"\n" + b.encode() + b"\n", _ident, _ident),
    st.builds(lambda s: b"P" + s.encode() + b"\n", st.sampled_from(["0", "storage", "x"])),
    st.builds(lambda b: b"\x82" + bytes([b]), st.integers(0, 255)),
    st.binary(min_size=1, max_size=4),
)

CONTAINERS = ["raw", "zip", "torch_save", "torchscript_zip"]


def _hostile_file(h: Hostile, kind: str, protocol: int, container: str, fragments: list[bytes],
                  insert_at: int) -> bytes:
    if kind == "mixture":
        inner = list(fragments)
        if insert_at >= 0:
            inner.insert(insert_at % (len(inner) + 1), h.fragment(KINDS[insert_at % len(KINDS)]))
        body = (b"\x80" + bytes([protocol]) if protocol >= 2 else b"") + b"".join(inner) + b"."
    else:
        body = h.body(kind, protocol)
    if container == "raw":
        return body
    if container == "torch_save" and kind in h.objects():  # exactly what torch.save writes
        import torch

        buf = io.BytesIO()
        torch.save(h.objects()[kind], buf, pickle_protocol=protocol)
        return buf.getvalue()
    members = _template_zip()
    members["archive/data.pkl"] = body
    if container == "torchscript_zip":
        members["archive/constants.pkl"] = body
        members["archive/code/__torch__.py"] = b"def forward(self):\n    return None\n"
    return _rezip(members)


def test_hostile_pickles(work, hostile):
    h = hostile
    before = {"antigravity": "antigravity" in sys.modules}
    assert h.mod_name not in sys.modules

    @fuzz_settings("pickle")
    @given(kind=st.sampled_from(KINDS + ["mixture"] * 4), protocol=st.integers(2, 5),
           container=st.sampled_from(CONTAINERS), fragments=st.lists(opcode_fragment, max_size=25),
           insert_at=st.integers(-3, 40), suffix=st.sampled_from([".pt", ".pt", ".pth", ".bin", ".ckpt"]),
           use_arch=st.booleans())
    @example(kind="system", protocol=2, container="raw", fragments=[], insert_at=0, suffix=".pt", use_arch=False)
    @example(kind="system", protocol=2, container="torch_save", fragments=[], insert_at=0, suffix=".pt", use_arch=False)
    @example(kind="open", protocol=5, container="torch_save", fragments=[], insert_at=0, suffix=".pth", use_arch=True)
    @example(kind="import_antigravity", protocol=4, container="zip", fragments=[], insert_at=0, suffix=".pt",
             use_arch=False)
    @example(kind="import_module_chain", protocol=3, container="zip", fragments=[], insert_at=0, suffix=".pt",
             use_arch=False)
    @example(kind="import_module_chain", protocol=2, container="raw", fragments=[], insert_at=0, suffix=".bin",
             use_arch=False)
    @example(kind="runpy", protocol=2, container="torchscript_zip", fragments=[], insert_at=0, suffix=".pt",
             use_arch=False)
    def inner(kind, protocol, container, fragments, insert_at, suffix, use_arch):
        for m in h.markers():
            if m.exists():
                m.unlink()
        data = _hostile_file(h, kind, protocol, container, fragments, insert_at)
        path = h.root / f"evil{suffix}"
        path.write_bytes(data)
        argv = ["inspect", str(path)] + (["--arch", MLP_ARCH] if use_arch else [])
        o = run_cli(argv)
        created = [m for m in h.markers() if m.exists()]
        imported = [n for n in (h.mod_name,) if n in sys.modules]
        if "antigravity" in sys.modules and not before["antigravity"]:
            imported.append("antigravity")
        fh.STATS["pickle_files"] += len(created)
        for m in created:
            m.unlink()
        for name in imported:
            sys.modules.pop(name, None)
        ran = [f"THE PAYLOAD RAN: files created {[str(c) for c in created]}, modules imported {imported}"] \
            if created or imported else []
        repro = (f"_hostile_file(kind={kind!r}, protocol={protocol}, container={container!r}, "
                 f"fragments={fragments!r}, insert_at={insert_at})")
        record("pickle", argv, o, {3}, repro, files={f"input{suffix}": data}, extra_problems=ran)

    inner()
    fh.check_no_failures("pickle")


# =============================================================================================
# 4. spec strings for every option that takes one

ABLATE = ["ablate", MLP_ST, "--arch", MLP_ARCH, "--data", MLP_DATA, "--max-batches", "1", "--batch-size", "16",
          "--device", "cpu"]
SCORE = ["score", MLP_ST, "--arch", MLP_ARCH, "--data", MLP_DATA, "--max-batches", "1", "--device", "cpu"]
REGISTERED = ["weight_norm", "weight_norm_out", "weight_change", "weight_change_rel", "grad_norm", "act_mean",
              "act_var", "act_entropy", "apoz", "dormant", "taylor", "taylor_delta", "output_corr", "composite",
              "ablation"]

# callables that are not model factories / data sources: fitcli must call them as user code and
# report what they did as an input error (exit 3), never 'unexpected', never success
NOT_A_FACTORY = ["os:system", "sys:exit", "builtins:exec", "builtins:eval", "builtins:open", "builtins:__import__",
                 "shutil:rmtree", "os:remove", "os:_exit", "subprocess:call", "os:getcwd", "collections:OrderedDict",
                 "torch.nn:Linear", "torch.nn:ReLU", "os.path:sep", "sample_models/models.py:cnn",
                 "sample_models/models.py:nope", "sample_models/models.py:mlp.x", "nonexistent_zz.py:fn",
                 "/etc/passwd:x", "nonexistent_mod_zz:f", "os:nope_zz"]
ARCH_CURATED = NOT_A_FACTORY + [
    MLP_ARCH, "sample_models/models.py:MLP", "sample_models/models.py:resmlp", "sample_models/models.py:Block",
    "torch.nn:Identity", "a:b:c", "x.py:", ":fn", ":", "::", "os::system", "os:sys tem", "os:", "os.:system",
    "../../etc/passwd", "/etc/passwd", "sample_models/models.py", "sample_models/models.py:1x", "x" * 5000 + ":f",
    "sample_models/models.py:mlp ", " sample_models/models.py:mlp", "sample_models\\models.py:mlp",
    "./sample_models/models.py:mlp", "sample_models/../sample_models/models.py:mlp", "os:system()", "é:f",
    "sample_models/models.py:MLP.forward"]
ARCH_ALLOW = frozenset(ARCH_CURATED)

DATA_CURATED = [
    "random:", "random:0x3", "random:1x28x28,n=-1", "random:3,seed=abc", "a:b:c", "x.py:", ":fn", "os:system",
    "sys:exit", "../../etc/passwd", "random:16", "random:16,n=1", "random:16,n=0", "random:16,n=8,seed=3",
    "random:1x28x28", "random:1x1x1x1x1x1x1", "random:99999x99999", "random:16,n=2147483648",
    "random:46341x46341,n=1", "random:16,seed=-1", "random:16,seed=99999999999999999999", "random:16,foo=1",
    "random:16,n=1,n=2", "random: 16", "RANDOM:16", "random:16,", "random:16,n=", "random:16 ,n=2",
    "random:١٦", "random:16\n", "random:16,n=٣", "random:-16", "random:16x", "random:x16", "random:0",
    MLP_DATA, "sample_models/cnn_data.safetensors", "sample_models/resmlp_data.safetensors", MLP_ST,
    "pyproject.toml", "README.md", "/etc/passwd", ".", "sample_models", "/dev/null", "missing.pt",
    "missing.safetensors", "builtins:list", "builtins:iter", "itertools:count", "sample_models/models.py:mlp",
    "nonexistent_mod_zz:f", "os:getcwd", "builtins:dict", "collections:OrderedDict", "builtins:exec"]
DATA_ALLOW = frozenset(DATA_CURATED)


@st.composite
def random_specs(draw):
    dims = draw(st.lists(st.one_of(st.integers(-2, 40), st.sampled_from([0, 16, 2**31, 2**40, 10**30])),
                         max_size=8))
    sep = draw(st.sampled_from(["x", "x", "x", "X", "*", ",", "x ", "×"]))
    opts = draw(st.lists(st.tuples(st.sampled_from(["n", "n", "seed", "N", "foo", "", "n "]), st.one_of(
        st.integers(-5, 300).map(str), st.sampled_from(["", "abc", "1e3", "0x10", "99999999999999999999", "-1",
                                                        " 3", "٣", "3.0", "2147483648", "="]))), max_size=3))
    prefix = draw(st.sampled_from(["random:"] * 6 + ["Random:", "random", "random::", " random:", "rand:"]))
    return prefix + sep.join(str(d) for d in dims) + "".join(f",{k}={v}" for k, v in opts)


def _random_alloc_ok(spec: str) -> bool:
    """`inspect` draws one batch of <= 8 samples; keep a valid random: spec under ~256 MB
    (fitcli accepts up to 2**31 values per spec, which is 8 GiB of float32: see the report)."""
    from fitcli.data import parse_random

    try:
        shape, n, _ = parse_random(spec)
    except Exception:
        return True
    numel = min(n, 8)
    for s in shape:
        numel *= s
    return numel * 4 <= 256 * 2**20


@st.composite
def arch_kwargs_values(draw):
    known = st.sampled_from(["in_features", "hidden", "classes"])
    key = st.one_of(known, known, st.text(max_size=8))
    ints = st.one_of(st.integers(-3, 64), st.sampled_from([0, 16, 32, 4, 4096, 2**63, 2**64, -(2**63), 10**30]))
    val = st.one_of(ints, ints, st.floats(), st.booleans(), st.none(), st.text(max_size=5),
                    st.lists(st.integers(0, 4), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
    obj = draw(st.dictionaries(key, val, max_size=4))
    top = draw(st.sampled_from(["obj"] * 6 + ["list", "scalar", "nan"]))
    if top == "list":
        obj = list(obj.items())
    elif top == "scalar":
        obj = draw(st.one_of(st.integers(), st.text(max_size=5), st.none(), st.booleans()))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if top == "nan":
        text = draw(st.sampled_from(['{"hidden": NaN}', '{"hidden": Infinity}', "NaN", '{"hidden": 1e400}',
                                     '{"hidden": -Infinity}']))
    return text


ARCH_KWARGS_CURATED = [
    "", "{}", '{"hidden": 32}', '{"in_features": 16, "hidden": 32, "classes": 4}', '{"hidden": 8}',
    '{"hidden": -1}', '{"hidden": 0}', '{"hidden": true}', '{"hidden": 32.0}', '{"hidden": "32"}', '{"nope": 1}',
    "[]", "null", "1", '"x"', "{", "{'hidden': 32}", '{"hidden": 32,}', '{"hidden": 32} trailing',
    "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, '{"hidden": ' + "9" * 5000 + "}",
    '{"hidden": 1e400}', '{"hidden": NaN}', "\ufeff{}", '{"\\ud800": 1}', '{"hidden": 32, "hidden": 8}']

UNITS_CURATED = ["0", "0,3,7-9", "31", "32", "0-31", "31-0", "-1", "1-", "-", ",", "0,,1", " 0 , 1 ", "0-1-2",
                 "٣", "0x1", "1.0", "99999999999999999999", "0-99999999999999999999", "", " ", "a", "0;1",
                 "0-" + "9" * 5000, ",".join(str(i) for i in range(32)) * 50]

LAYER_CURATED = ["fc1", "fc2", "fc3", "relu1", "*", "fc?", "fc[12]", "fc[!3]", "[", "[!", "**", "", " ", "FC1",
                 "fc1 ", "fc1.weight", "fc*x", "\\*", "*" * 2000 + "x", "[" * 1000, "fc4", "relu2", "f*c*1*"]

METRIC_CURATED = REGISTERED + ["", "act-mean", "ACT_MEAN", "actmean", "all", "*", "weight_norm ", "nope",
                               "taylor,act_mean", "fitcli.metrics.weights:WeightNorm", "ablation" * 100]

LOSS_CURATED = ["cross_entropy", "mse", "CrossEntropy", "cross-entropy", "", "os:system", "sys:exit",
                "builtins:print", "builtins:len", "torch:add", "torch:sub", "torch.nn.functional:mse_loss",
                "torch.nn.functional:cross_entropy", "torch.nn.functional:l1_loss", "nonexistent_mod_zz:f",
                "x.py:f", "sample_models/models.py:mlp", ":", "a:b:c", "builtins:exec", "builtins:eval",
                "json:dumps", "operator:getitem", "math:hypot"]
LOSS_ALLOW = frozenset(LOSS_CURATED)

TAU_CURATED = ["0", "0.5", "-0", "-0.1", "nan", "NaN", "inf", "-inf", "1e309", "1e-320", "0x10", "1_0", " 1",
               "", "abc", "1e", "--", "1,5", "٣", "1" * 5000, "0.0.0"]

BATCH_CURATED = ["1", "16", "0", "-1", "1e3", "0x10", "+5", " 5", "٥", "", "abc", "99999999999999999999",
                 "2147483648", "1.5", "1_000", "5 "]


def _fmt_float(draw_f, style):
    if style == "repr":
        return repr(draw_f)
    if style == "sci":
        return f"{draw_f:e}"
    return f"{draw_f:.3f}"


MODEL_CURATED = [MLP_ST, "sample_models/mlp.pt", "missing.safetensors", "", ".", "sample_models", "/dev/null",
                 "/etc/passwd", "../../etc/passwd", "pyproject.toml", "x" * 300, "é" * 200, "sample_models/models.py",
                 "sample_models/mlp.safetensors/", "-", "--", "~/m.pt", "m.pt2", "sample_models/.", "/"]

SPEC_OPTIONS: dict[str, dict] = {
    "model": dict(base=["inspect"], flag=None, values=spec_values(MODEL_CURATED), allow=frozenset(),
                  expect={MLP_ST: {0}, "missing.safetensors": {3}}),
    "data": dict(base=["inspect", MLP_ST, "--arch", MLP_ARCH], flag="--data",
                 values=spec_values(DATA_CURATED, random_specs()), allow=DATA_ALLOW,
                 expect={"os:system": {3}, "sys:exit": {3}, "builtins:exec": {3}, "os:getcwd": {3}}),
    "arch": dict(base=["inspect", MLP_ST], flag="--arch", values=spec_values(ARCH_CURATED), allow=ARCH_ALLOW,
                 expect={**{s: {3} for s in NOT_A_FACTORY}, "sample_models/models.py:MLP": {0}}),
    "arch_kwargs": dict(base=["inspect", MLP_ST, "--arch", "sample_models/models.py:MLP"], flag="--arch-kwargs",
                        values=spec_values(ARCH_KWARGS_CURATED, arch_kwargs_values()), allow=frozenset(),
                        expect={'{"hidden": 32}': {0}, "[" * 5000 + "]" * 5000: {2}}),
    "units": dict(base=ABLATE + ["--layer", "fc2"], flag="--units", allow=frozenset(),
                  values=spec_values(UNITS_CURATED, st.lists(st.one_of(
                      st.integers(-1, 40).map(str),
                      st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda t: f"{t[0]}-{t[1]}"),
                      st.sampled_from(["", " ", "-", "9" * 30])), min_size=1, max_size=5).map(",".join)),
                  expect={"0,3,7-9": {0}, "32": {2}}),
    "layer": dict(base=ABLATE + ["--units", "0"], flag="--layer", values=spec_values(LAYER_CURATED),
                  allow=frozenset(), expect={"fc2": {0}, "fc4": {2}}),
    "metric": dict(base=SCORE + ["--batch-size", "16"], flag="--metric", values=spec_values(METRIC_CURATED),
                   allow=frozenset(), expect={"act_mean": {0}, "nope": {2}}),
    "loss": dict(base=ABLATE + ["--layer", "fc2", "--units", "0-1"], flag="--loss", values=spec_values(LOSS_CURATED),
                 allow=LOSS_ALLOW, expect={"cross_entropy": {0}}),
    "tau": dict(base=SCORE + ["--batch-size", "16", "--metric", "act_mean", "--metric", "weight_norm"], flag="--tau",
                values=spec_values(TAU_CURATED, st.builds(_fmt_float, st.floats(),
                                                          st.sampled_from(["repr", "sci", "fix"]))),
                allow=frozenset(), expect={"0.5": {0}, "nan": {2}, "-0.1": {2}}),
    "batch_size": dict(base=SCORE + ["--metric", "act_mean"], flag="--batch-size",
                       values=spec_values(BATCH_CURATED, st.one_of(st.integers(-10, 10**6), st.sampled_from(
                           [0, 1, 2**31, 2**63, 10**30])).map(str)),
                       allow=frozenset(), expect={"16": {0}, "0": {2}}),
}


@pytest.mark.parametrize("option", list(SPEC_OPTIONS))
def test_spec_strings(option, work):
    opt = SPEC_OPTIONS[option]
    multi = option in ("layer", "metric")
    curated_examples = [v for v in {**dict.fromkeys(opt["expect"]), **dict.fromkeys(_brief_examples(option))}]

    def run_one(values: list[str], form: str):
        for v in values:
            assume(argv_safe(v))
            if opt["allow"] or option in ("data", "arch", "loss"):
                assume(spec_is_safe(v, opt["allow"]))
            if option == "data":
                assume(_random_alloc_ok(v))
        extra: list[str] = []
        for v in values:
            if opt["flag"] is None:  # positional (MODEL)
                extra += ["--", v] if form == "eq" else [v]
            else:
                extra += [f"{opt['flag']}={v}"] if form == "eq" else [opt["flag"], v]
        argv = opt["base"] + extra
        o = run_cli(argv)
        allowed = {0, 2, 3, 4}
        if len(values) == 1 and values[0] in opt["expect"]:
            allowed = opt["expect"][values[0]]
        record(f"spec:{option}", argv, o, allowed, f"fitcli.cli.main({fh.argv_expr(argv)})  # cwd = repository root")

    strat = st.lists(opt["values"], min_size=1, max_size=3) if multi else opt["values"].map(lambda v: [v])

    def inner(values, form):
        run_one(values, form)

    for v in curated_examples:
        inner = example(values=[v], form="sep")(inner)
    inner = fuzz_settings(f"spec:{option}")(given(values=strat, form=st.sampled_from(["sep", "sep", "eq"]))(inner))
    inner()
    fh.check_no_failures(f"spec:{option}")


def _brief_examples(option: str) -> list[str]:
    """The near-misses every run tries (explicit examples), whatever hypothesis draws."""
    return {
        "model": ["x" * 300, "é" * 200, "", "/dev/null", "sample_models"],
        "data": ["random:", "random:0x3", "random:1x28x28,n=-1", "random:3,seed=abc", "a:b:c", "x.py:", ":fn",
                 "os:system", "sys:exit", "../../etc/passwd", "x" * 100000, "é" * 1000, "x" * 300, "random:16",
                 "random:46341x46341,n=1"],
        "arch": ["a:b:c", "x.py:", ":fn", "os:system", "sys:exit", "../../etc/passwd", "builtins:exec",
                 "os:_exit", "sample_models/models.py:MLP", "x" * 5000 + ":f", "é:f"],
        "arch_kwargs": ["", "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000, '{"hidden": NaN}',
                        '{"hidden": 32}', "{", "9" * 10347, '{"classes": 1000000000000000000000000000000}'],
        "units": ["0,3,7-9", "32", "٣", "-1", "0-99999999999999999999", "", "0-" + "9" * 5000],
        "layer": ["fc2", "fc4", "*", "[", "", "*" * 2000 + "x"],
        "metric": ["act_mean", "nope", "", "ablation"],
        "loss": ["cross_entropy", "os:system", "sys:exit", "torch:add", "builtins:print", "nope"],
        "tau": ["0.5", "nan", "-0.1", "inf", "1e309", "abc"],
        "batch_size": ["16", "0", "-1", "99999999999999999999", "abc"],
    }[option]


# =============================================================================================
# 5. TOML config files

from fitcli.config import KEYS  # noqa: E402

TOML_KEYS = sorted(KEYS) + [k.replace("_", "-") for k in KEYS if "_" in k] + [
    "tool", "Arch", "unknown", "metrics ", "max-dead", "trust", "layers.x", "a.b"]
SAFE_STR_FOR = {
    "arch": [MLP_ARCH, "sample_models/models.py:MLP", "sample_models/models.py:cnn", "os:system", "sys:exit", ":x",
             "x.py:f", "nonexistent_mod_zz:f", ""],
    "data": ["random:16,n=4", "random:1x28x28", "random:0x3", MLP_DATA, "missing.pt", "os:system", "", "random:"],
    "arch_kwargs": ['{"hidden": 32}', "{", "[]", '{"hidden": 8}', ""],
    "format": ["json", "table", "csv", "markdown", "JSON", "xml", ""],
}


def toml_values(depth: int = 2) -> st.SearchStrategy:
    scalars = st.one_of(
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
        st.integers(-5, 100), st.sampled_from([2**63 - 1, -(2**63), 2**63, 10**30]),
        st.floats(), st.booleans(),
        st.sampled_from([("dt", "1979-05-27T07:32:00Z"), ("dt", "1979-05-27"), ("dt", "07:32:00"),
                         ("dt", "1979-05-27T00:32:00.999999-07:00")]),
    )
    if depth == 0:
        return scalars
    return st.one_of(scalars, scalars, st.lists(toml_values(depth - 1), max_size=3),
                     st.dictionaries(st.sampled_from(["a", "hidden", "x y", "fitcli", "arch"]), toml_values(depth - 1),
                                     max_size=3).map(lambda d: ("table", d)))


def render_toml_value(v) -> str:
    if isinstance(v, tuple) and v and v[0] == "dt":
        return v[1]
    if isinstance(v, tuple) and v and v[0] == "table":
        return "{ " + ", ".join(f"{json.dumps(k)} = {render_toml_value(x)}" for k, x in v[1].items()) + " }"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(render_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def _sanitize(v):
    """Any string in a config may end up as --arch/--data/--loss: no spec that names real code."""
    if isinstance(v, str):
        return v if spec_is_safe(v) else "x.py:f"
    if isinstance(v, list):
        return [_sanitize(x) for x in v]
    if isinstance(v, tuple) and v and v[0] == "table":
        return ("table", {k: _sanitize(x) for k, x in v[1].items()})
    return v


@st.composite
def toml_docs(draw) -> bytes:
    style = draw(st.sampled_from(["flat", "section", "dotted", "tool_value", "raw_text", "raw_bytes", "mutated",
                                  "section", "flat"]))
    if style == "raw_text":
        return draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)).encode()
    if style == "raw_bytes":
        return draw(st.binary(max_size=200))
    entries = []
    for key in draw(st.lists(st.sampled_from(TOML_KEYS) | st.text(max_size=6), max_size=6)):
        norm = key.replace("-", "_")
        if norm in SAFE_STR_FOR and draw(st.booleans()):
            value = draw(st.sampled_from(SAFE_STR_FOR[norm]))
        else:
            value = _sanitize(draw(toml_values()))
        entries.append((key, value))
    def qk(k: str) -> str:  # bare key when TOML allows it, else a quoted key
        return k if k and all(c.isalnum() or c in "-_" for c in k) and k.isascii() else json.dumps(k)

    lines = [f"{qk(k) if style != 'dotted' else 'tool.fitcli.' + qk(k)} = {render_toml_value(v)}" for k, v in entries]
    if style == "section":
        lines.insert(0, draw(st.sampled_from(["[tool.fitcli]", "[tool.fitcli]", "[tool]", "[fitcli]", "[[tool.fitcli]]",
                                              "[tool.other]", "[ tool . fitcli ]"])))
    elif style == "tool_value":
        lines = ["[tool]", f"fitcli = {render_toml_value(_sanitize(draw(toml_values())))}"] + lines
    doc = "\n".join(lines) + "\n"
    if style == "mutated" and doc:
        i = draw(st.integers(0, len(doc)))
        op = draw(st.sampled_from(["truncate", "insert", "delete", "dup"]))
        if op == "truncate":
            doc = doc[:i]
        elif op == "insert":
            doc = doc[:i] + draw(st.sampled_from(["=", "[", "]", '"', "\n", "{", ",", "#", "'''", "\\", "\x7f"])) + doc[i:]
        elif op == "delete":
            doc = doc[:i] + doc[i + 3:]
        else:
            doc = doc + doc
    return doc.encode("utf-8")


TOML_EXAMPLES = [
    b"", b"arch = 5\n", b"bogus = 1\n", b"[tool.fitcli]\nformat = \"xml\"\n", b"[tool]\nfitcli = 1\n",
    b"[tool]\nfitcli = \"abc\"\n", b"[tool]\nfitcli = [1, 2]\n", b"tool = 3\n",
    b"arch = \"sample_models/models.py:mlp\"\narch_kwargs = {a = 1979-05-27}\n",
    b"arch = \"sample_models/models.py:mlp\"\narch_kwargs = {hidden = 8}\n",
    b"arch = \"sample_models/models.py:mlp\"\ndata = \"random:16,n=4\"\n",
    b"arch = \"os:system\"\n", b"arch = \"sys:exit\"\n", b"layers = [1, 2]\n", b"tau = nan\n", b"top = true\n",
    b"format = \"json\"\n", b"mode = \"half\"\n", b"[tool.fitcli\n", b"\xff\xfe", b"a = \"\\ud800\"\n",
    b"arch_kwargs = \"{\"\narch = \"sample_models/models.py:mlp\"\n", b"max-dead = 5\n", b"x = 1\nx = 2\n",
    b"[[tool.fitcli]]\n",
]


def test_toml_config(work):
    path = work / "fitcli.toml"

    def inner(doc):
        path.write_bytes(doc)
        argv = ["inspect", MLP_ST, "--config", str(path)]
        o = run_cli(argv)
        record("toml", argv, o, {0, 2, 3}, f"fitcli.toml containing {doc!r}", files={"fitcli.toml": doc})

    for d in TOML_EXAMPLES:
        inner = example(doc=d)(inner)
    inner = fuzz_settings("toml")(given(doc=toml_docs())(inner))
    inner()
    fh.check_no_failures("toml")


@pytest.mark.parametrize("name", ["fitcli.toml", "pyproject.toml"])
def test_toml_config_discovered(name, work):
    """The same documents found by walking up from the cwd (no --config): fitcli.toml or
    pyproject.toml [tool.fitcli]. The cwd is a scratch folder; MODEL is an absolute path."""
    folder = work / f"discover_{name.split('.')[0]}"
    folder.mkdir(exist_ok=True)
    docs = TOML_EXAMPLES + [b"tool = 3\n", b"[tool]\nfitcli = 3\n", b"tool = []\n", b"[tool.fitcli]\nbogus = 1\n"]
    try:
        os.chdir(folder)
        for doc in docs:
            if name == "pyproject.toml" and doc.startswith((b"arch", b"bogus", b"format", b"layers")):
                doc = b"[tool.fitcli]\n" + doc
            (folder / name).write_bytes(doc)
            argv = ["inspect", str(REPO / MLP_ST)]
            o = run_cli(argv)
            record(f"toml_discovered:{name}", argv, o, {0, 2, 3}, f"cwd containing {name} = {doc!r}",
                   files={name: doc})
    finally:
        os.chdir(REPO)
    fh.check_no_failures(f"toml_discovered:{name}")


@pytest.mark.parametrize("which", ["directory", "missing", "dev_null", "binary", "fifo_like_dir_file"])
def test_toml_config_paths(which, work):
    """--config pointing at things that are not TOML files."""
    target = {"directory": str(work), "missing": str(work / "nope.toml"), "dev_null": "/dev/null",
              "binary": str(REPO / MLP_ST), "fifo_like_dir_file": str(work / "fitcli.toml" / "x")}[which]
    argv = ["inspect", MLP_ST, "--config", target]
    o = run_cli(argv)
    bad = record("toml_paths", argv, o, {0, 2, 3}, f"fitcli.cli.main({argv!r})")
    assert not bad, (bad, o)


# =============================================================================================


def test_zz_summary():
    """One line for the whole session; fails when any fuzz target crashed, hung or let a pickle
    payload run. With every target run in full, also checks the total budget was spent."""
    line = fh.summary_line()
    print("\n" + line)
    for target, codes in fh.STATS["per_target"].items():
        print(f"  {target}: {sum(codes.values())} inputs, exit codes {dict(sorted(codes.items(), key=str))}")
    changed = sorted(k for k, v in _repo_snapshot().items() if _SNAPSHOT.get(k) != v)
    changed += sorted(k for k in _SNAPSHOT if not (REPO / k).exists())
    for text in fh.failures():
        print(text.split("\n")[0] + "\n    " + "\n    ".join(text.split("\n")[1:3]))
    out = os.environ.get("FITCLI_FUZZ_SUMMARY")
    if out:
        Path(out).write_text(line + "\n\n" + "".join(t + "\n\n" for t in fh.failures()))
    assert not changed, f"fuzzing created, changed or removed files in the repository: {changed}"
    assert fh.STATS["crashes"] == 0, line
    assert fh.STATS["hangs"] == 0, line
    assert fh.STATS["pickle_files"] == 0, line
    if fh.STATS["targets_done"] >= set(fh.WEIGHTS):
        assert fh.STATS["inputs"] >= fh.TOTAL, f"{line}: fewer than FITCLI_FUZZ_EXAMPLES={fh.TOTAL} inputs"
