"""Adversarial inputs to the ops, their C++ bindings and their saved artifacts: absurd sizes,
degenerate parameters, corrupt and tampered files, in-place edits. Each case must end in a clear
Python exception (type and message checked) or in a right answer: never an abort, a hang on a
terabyte allocation, or a silently wrong result.

The cases run in child processes (tests/adversarial.py), one batch per group, with the memory
bound of sigma_fast._checks.check_alloc fixed at 1 GiB so the same sizes are refused on every
machine; a case that killed its process fails the test with the case's name.
"""

import json

import pytest

from adversarial import Case, run_batch

PRELUDE = r"""
import json, math, shutil, tempfile, warnings
from pathlib import Path
import numpy as np
import torch
import sigma_fast as sf
from sigma_fast import _core

TMP = Path(tempfile.mkdtemp())
_r = np.random.default_rng(0)
X = _r.standard_normal((64, 8)).astype(np.float32)
CB = _r.standard_normal((2, 4, 8)).astype(np.float32)          # K^L = 16
CB_BIG = _r.standard_normal((4, 256, 8)).astype(np.float32)    # K^L = 2^32
CODES = _r.integers(0, 6, size=(50, 3))
EMB = _r.standard_normal((50, 8)).astype(np.float32)

def index():
    return sf.ItemIndex(EMB, CODES[:, 0])

def apf_inputs(idx, b=3, k=4, seed=1):
    r = np.random.default_rng(seed)
    phi = -np.sort(np.abs(r.standard_normal((b, k))), axis=1).astype(np.float32)
    pids = r.integers(0, idx.num_buckets, size=(b, k))
    q = r.standard_normal((b, k, idx.dim)).astype(np.float32)
    return phi, pids, q

def run_apf(idx=None, phi=None, **kw):
    idx = idx or index()
    p, pids, q = apf_inputs(idx)
    kw = {"top_m": 5, "top_n": 8, "tau": 0.05, **kw}
    return sf.apf_fuse(p if phi is None else phi, pids, q, idx, **kw)

def saved(obj, name):
    d = TMP / name
    obj.save(d)
    return d

def edit_json(path, **changes):
    c = json.loads(path.read_text())
    c.update(changes)
    path.write_text(json.dumps(c))

def drop_json(path, key):
    c = json.loads(path.read_text())
    del c[key]
    path.write_text(json.dumps(c))

def flip_byte(path, offset=-3):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))

def step_inputs(trie, b=2, w=3):
    logits = np.zeros((b, w, trie.codebook_size), np.float32)
    scores = np.full((b, w), -np.inf, np.float32)
    scores[:, 0] = 0.0
    return logits, scores, np.zeros((b, w), np.int64)

def trie():
    return sf.PrefixTrie(CODES)
"""


def _bad_config_cases(prefix: str, make: str, config: str, load: str, fields: dict) -> list:
    """One case per (field, bad value): the saved JSON edited, load must name the field."""
    cases = []
    for field, values in fields.items():
        for i, value in enumerate(values):
            cases.append(Case(
                f"{prefix}_json_{field}_{i}",
                f"d = saved({make}, '{prefix}_{field}_{i}')\n"
                f"edit_json(d / '{config}', {field}=json.loads({json.dumps(json.dumps(value))}))\n"
                f"{load}(d)",
                "ValueError", rf"{config}: field '{field}' must be"))
    return cases


# ---------------------------------------------------------------------- residual quantization
RQ = [
    Case("rq_beam_2pow62_wide_codebooks", "sf.rq_encode(X, CB_BIG, beam_width=2**62)",
         "ValueError", r"beam_width \* K must be < 2\^31.*K = 256"),
    Case("rq_beam_1e9_wide_codebooks", "sf.rq_encode(X, CB_BIG, beam_width=10**9)",
         "ValueError", r"beam_width \* K must be < 2\^31"),
    Case("rq_beam_1e9_reference", "sf.rq_encode(X, CB_BIG, beam_width=10**9, backend='reference')",
         "ValueError", r"beam_width \* K must be < 2\^31"),
    Case("rq_beam_workspace_over_memory", "sf.rq_encode(X, CB_BIG, beam_width=4 * 10**6)",
         "ValueError", r"beam_width=4000000 .* beam search workspace .* would need [0-9.]+ GiB, "
                       r"more than this machine's 1 GiB"),
    Case("rq_beam_2pow62_is_exhaustive", """
        for backend in ("cpu", "reference"):
            got = sf.rq_encode(X, CB, beam_width=2**62, backend=backend)
            want = sf.rq_encode(X, CB, beam_width=16, backend=backend)
            assert np.array_equal(got, want), backend
        """),
    Case("rq_beam_1e9_is_exhaustive",
         "assert np.array_equal(sf.rq_encode(X, CB, beam_width=10**9), "
         "sf.rq_encode(X, CB, beam_width=16))"),
    Case("rq_beam_zero", "sf.rq_encode(X, CB, beam_width=0)", "ValueError",
         "beam_width must be >= 1; got 0"),
    Case("rq_beam_negative", "sf.rq_encode(X, CB, beam_width=-2**63)", "ValueError",
         "beam_width must be >= 1"),
    Case("rq_beam_bool", "sf.rq_encode(X, CB, beam_width=True)", "TypeError",
         "beam_width must be an int; got bool"),
    Case("rq_beam_float", "sf.rq_encode(X, CB, beam_width=2.7)", "TypeError",
         "beam_width must be an int; got float"),
    Case("rq_beam_none", "sf.rq_encode(X, CB, beam_width=None)", "TypeError",
         "beam_width must be an int; got NoneType"),
    Case("rq_x_1e30", "sf.rq_encode(X * np.float32(1e30), CB)", "ValueError",
         r"x must lie in \[-[0-9.e+]+, [0-9.e+]+\] "
         r"\(sqrt\(FLT_MAX / D\) / \(L \+ 2\) for D = 8, L = 2"),
    Case("rq_x_1e30_reference", "sf.rq_encode(X * np.float32(1e30), CB, backend='reference')",
         "ValueError", r"x must lie in"),
    Case("rq_codebooks_3e38", "sf.rq_encode(X, CB * np.float32(3e38 / 4))", "ValueError",
         r"codebooks must lie in"),
    Case("rq_x_nan", "x = X.copy(); x[3, 2] = np.nan; sf.rq_encode(x, CB)", "ValueError",
         r"x must be finite; got nan at index \[3, 2\]"),
    Case("rq_x_inf_reference",
         "x = X.copy(); x[0, 0] = -np.inf; sf.rq_encode(x, CB, backend='reference')",
         "ValueError", r"x must be finite; got -inf at index \[0, 0\]"),
    Case("rq_reference_matches_cpu_at_1e17", """
        from sigma_fast.testing import assert_rq_codes_close
        xs = (X / np.abs(X).max() * np.float32(1e17)).astype(np.float32)
        # greedy: every backend exactly, and the exact argmin of |c|^2 - 2<x, c> at level 0
        ref = sf.rq_encode(xs, CB, backend="reference")
        assert np.array_equal(ref, sf.rq_encode(xs, CB, backend="cpu"))
        exact = np.argmin((CB[0].astype(np.float64) ** 2).sum(1)[None]
                          - 2 * xs.astype(np.float64) @ CB[0].T.astype(np.float64), axis=1)
        assert np.array_equal(ref[:, 0], exact)
        # beam: the C++ kernel that keeps float32 residuals (as the reference does) exactly,
        # the default one within the tie-aware tolerance
        for beam in (2, 3):
            codes = np.empty((len(xs), 2), np.int64)
            _core.rq_encode(xs, CB, beam, codes, None, "direct")
            assert np.array_equal(codes, sf.rq_encode(xs, CB, beam_width=beam,
                                                      backend="reference")), beam
            assert_rq_codes_close(xs, CB, sf.rq_encode(xs, CB, beam_width=beam),
                                  beam_width=beam)
        """),
    Case("rq_reference_matches_cpu_at_bound", """
        bound = sf.rq.max_abs_value(8, 2)
        xs = (X / np.abs(X).max() * np.float32(bound * 0.99)).astype(np.float32)
        assert np.array_equal(sf.rq_encode(xs, CB, backend="reference"),
                              sf.rq_encode(xs, CB, backend="cpu"))
        """),
    Case("rq_decode_code_2pow62", "sf.rq_decode(np.array([[2**62, 0]]), CB)", "IndexError",
         r"codes must lie in \[0, 4\); got 4611686018427387904"),
    Case("rq_decode_negative_code", "sf.rq_decode(np.array([[0, -1]]), CB)", "IndexError",
         r"codes must lie in \[0, 4\); got -1"),
    Case("rq_dedup_bad_max_suffix", "sf.dedup_codes(CODES, max_suffix=-1)", "ValueError",
         "max_suffix must be >= 0"),
    Case("rq_fit_codebook_2pow40",
         "sf.ResidualQuantizer().fit(X, 2, 2**40, iters=1, progress=False)", "ValueError",
         "fit needs at least codebook_size = 1099511627776 rows; got 64"),
    Case("rq_quantizer_beam_1e12_narrow", """
        rq = sf.ResidualQuantizer(CB, beam_width=10**12)
        assert np.array_equal(rq.encode(X), sf.rq_encode(X, CB, beam_width=16))
        """),
    Case("rq_quantizer_beam_1e12_wide", "sf.ResidualQuantizer(CB_BIG, beam_width=10**12).encode(X)",
         "ValueError", r"beam_width \* K must be < 2\^31"),
    Case("rq_set_num_threads_none", "sf.set_num_threads(None)", "TypeError",
         r"n \(the number of threads\) must be an int; got NoneType"),
    Case("rq_set_num_threads_negative", "sf.set_num_threads(-1)", "ValueError",
         r"n \(the number of threads\) must be >= 0; got -1"),
    Case("rq_set_num_threads_huge", "sf.set_num_threads(10**9)", "ValueError",
         r"must be <= 1024; got 1000000000"),
    Case("rq_set_num_threads_float", "sf.set_num_threads(2.5)", "TypeError",
         "must be an int; got float"),
]

# ResidualQuantizer artifacts
RQ_SAVED = "sf.ResidualQuantizer(CB)"
RQ += _bad_config_cases("rq", RQ_SAVED, "rq_config.json", "sf.ResidualQuantizer.load", {
    "num_levels": ["2", 2.0, True, 0, None],
    "codebook_size": [-4, "4", 4.5],
    "dim": [0, [8]],
    "beam_width": [2.7, None, 0, "1", False],
    "fit_stats": [[1, 2]],
    "tensors_sha256": ["abc", 12, "A" * 64],
})
RQ += [
    Case("rq_json_format_version_str",
         "d = saved(sf.ResidualQuantizer(CB), 'rq_fv'); edit_json(d / 'rq_config.json', "
         "format_version='2'); sf.ResidualQuantizer.load(d)",
         "ValueError", "rq_config.json: field 'format_version' must be an int >= 1; got \"2\""),
    Case("rq_json_format_version_future",
         "d = saved(sf.ResidualQuantizer(CB), 'rq_fv9'); edit_json(d / 'rq_config.json', "
         "format_version=9); sf.ResidualQuantizer.load(d)",
         "ValueError", "format_version 9 is newer"),
    Case("rq_json_missing_checksum",
         "d = saved(sf.ResidualQuantizer(CB), 'rq_nosum'); "
         "drop_json(d / 'rq_config.json', 'tensors_sha256'); sf.ResidualQuantizer.load(d)",
         "ValueError", "missing field 'tensors_sha256'"),
    Case("rq_flipped_codebook_byte",
         "d = saved(sf.ResidualQuantizer(CB), 'rq_flip'); "
         "flip_byte(d / 'codebooks.safetensors'); sf.ResidualQuantizer.load(d)",
         "ValueError", r"codebooks.safetensors: checksum mismatch"),
    Case("rq_codebooks_of_another_save", """
        a = saved(sf.ResidualQuantizer(CB), "rq_a")
        b = saved(sf.ResidualQuantizer(CB * 2), "rq_b")
        shutil.copy(b / "codebooks.safetensors", a / "codebooks.safetensors")
        sf.ResidualQuantizer.load(a)
        """, "ValueError", "checksum mismatch.*from another save"),
    Case("rq_json_not_utf8",
         "d = saved(sf.ResidualQuantizer(CB), 'rq_u8'); (d / 'rq_config.json').write_bytes("
         "b'\\xff\\xfe{}'); sf.ResidualQuantizer.load(d)",
         "ValueError", "rq_config.json is not valid JSON"),
    Case("rq_json_a_list",
         "d = saved(sf.ResidualQuantizer(CB), 'rq_list'); (d / 'rq_config.json').write_text("
         "'[1, 2]'); sf.ResidualQuantizer.load(d)",
         "ValueError", "must hold a JSON object; got list"),
    Case("rq_format1_warns_and_loads", """
        d = saved(sf.ResidualQuantizer(CB), "rq_v1")
        drop_json(d / "rq_config.json", "tensors_sha256")
        edit_json(d / "rq_config.json", format_version=1)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            rq = sf.ResidualQuantizer.load(d)
        assert any("records no checksum" in str(x.message) for x in w), w
        assert torch.equal(rq.codebooks, torch.from_numpy(CB))
        """),
    Case("rq_saved_beam_1e12_loads_then_encodes", """
        d = saved(sf.ResidualQuantizer(CB), "rq_beam")
        edit_json(d / "rq_config.json", beam_width=10**12)
        rq = sf.ResidualQuantizer.load(d)
        assert np.array_equal(rq.encode(X), sf.rq_encode(X, CB, beam_width=16))
        """),
]

# ------------------------------------------------------------------------- trie and beam step
TRIE = [
    Case("trie_code_2pow40", "sf.PrefixTrie(np.array([[0, 2**40]]))", "ValueError",
         r"codes up to 1099511627776 \(codebook_size = 1099511627777\): the trie's int64 "
         r"\[codebook_size\] root table would need 8[0-9.e+]* GiB"),
    Case("trie_codebook_2pow62", "sf.PrefixTrie(CODES, codebook_size=2**62)", "ValueError",
         r"codebook_size=4611686018427387904: .* would need"),
    Case("trie_codebook_2pow70", "sf.PrefixTrie(CODES, codebook_size=2**70)", "ValueError",
         r"would need"),
    Case("trie_codebook_zero", "sf.PrefixTrie(CODES, codebook_size=0)", "ValueError",
         "codebook_size must be >= 1"),
    Case("trie_codes_int64_max",
         "sf.PrefixTrie(np.array([[np.iinfo(np.int64).max]]))", "ValueError", "would need"),
    Case("trie_negative_code", "sf.PrefixTrie(np.array([[0, -3]]))", "IndexError",
         r"codes must be >= 0; got -3"),
    Case("trie_duplicate_item_ids", "sf.PrefixTrie(CODES[:2], item_ids=[7, 7])", "ValueError",
         "item_ids must be unique .* got 7 2 times"),
    Case("trie_duplicate_item_ids_far_apart",
         "ids = np.arange(50); ids[49] = 3; sf.PrefixTrie(CODES, item_ids=ids)", "ValueError",
         "item_ids must be unique"),
    Case("trie_negative_item_id", "sf.PrefixTrie(CODES[:2], item_ids=[0, -1])", "IndexError",
         "item_ids must be >= 0"),
    Case("trie_ragged_codes", "sf.PrefixTrie([[0, 1], [2]])", "ValueError",
         "rectangular"),
    Case("trie_empty_codes", "sf.PrefixTrie(np.zeros((0, 3), np.int64))", "ValueError",
         "at least one row"),
    Case("trie_float_codes", "sf.PrefixTrie(np.zeros((2, 3), np.float32))", "TypeError",
         "codes must be int32 or int64"),
    Case("trie_binding_codebook_2pow62",
         "_core.trie_build(np.zeros((2, 2), np.int64), 2**62)", "MemoryError",
         r"trie_build: .*codebook_size=4611686018427387904"),
    Case("trie_binding_negative_codebook",
         "_core.trie_build(np.zeros((2, 2), np.int64), -1)", "ValueError",
         "codebook_size must be >= 1"),
]
TRIE += _bad_config_cases("trie", "trie()", "trie_config.json", "sf.PrefixTrie.load", {
    "num_items": ["50", 0], "num_levels": [3.0], "num_nodes": [None, -3],
    "codebook_size": [True], "item_id_bound": [50.5, "50"], "tensors_sha256": [None],
    "nodes_per_level": [["1"]],
})
TRIE += [
    Case("trie_json_num_nodes_1e12",
         "d = saved(trie(), 'trie_nodes'); edit_json(d / 'trie_config.json', num_nodes=10**12); "
         "sf.PrefixTrie.load(d)",
         "ValueError", r"field 'num_nodes' \(1000000000000\) must match"),
    Case("trie_json_item_id_bound_plus_one", """
        d = saved(trie(), "trie_bound")
        c = json.loads((d / "trie_config.json").read_text())
        edit_json(d / "trie_config.json", item_id_bound=c["item_id_bound"] + 1)
        sf.PrefixTrie.load(d)
        """, "ValueError", r"item_perm must .* reach item_id_bound - 1 = 50"),
    Case("trie_json_item_id_bound_minus_one",
         "d = saved(trie(), 'trie_bound2'); edit_json(d / 'trie_config.json', item_id_bound=49);"
         " sf.PrefixTrie.load(d)", "ValueError", "not a consistent trie: item_perm"),
    Case("trie_json_codebook_size_plus_one",
         "d = saved(trie(), 'trie_k'); edit_json(d / 'trie_config.json', codebook_size=7); "
         "sf.PrefixTrie.load(d)", "ValueError", r"root_children must be int64 \[7\]"),
    Case("trie_flipped_tensor_byte",
         "d = saved(trie(), 'trie_flip'); flip_byte(d / 'trie.safetensors'); "
         "sf.PrefixTrie.load(d)", "ValueError", "checksum mismatch"),
    Case("trie_format_version_str",
         "d = saved(trie(), 'trie_fv'); edit_json(d / 'trie_config.json', format_version='1'); "
         "sf.PrefixTrie.load(d)", "ValueError", "field 'format_version' must be an int"),
    Case("step_beam_2pow62", """
        t = trie(); lg, sc, st = step_inputs(t)
        sf.constrained_beam_step(torch.from_numpy(lg), torch.from_numpy(sc), torch.from_numpy(st),
                                 t, beam_width=2**62)
        """, "ValueError", r"beam_width=4611686018427387904 for B=2 requests: the four "
                           r"\[B, beam_width\] outputs .* would need"),
    Case("step_beam_1e9_numpy", """
        t = trie(); lg, sc, st = step_inputs(t, b=4)
        sf.constrained_beam_step(lg, sc, st, t, beam_width=10**9)
        """, "ValueError", r"beam_width=1000000000 for B=4 .* would need 104 GiB"),
    Case("step_beam_1e9_reference", """
        t = trie(); lg, sc, st = step_inputs(t)
        sf.constrained_beam_step(lg, sc, st, t, beam_width=10**9, backend="reference")
        """, "ValueError", "would need"),
    Case("step_beam_zero_fast_path", """
        t = trie(); lg, sc, st = step_inputs(t)
        sf.constrained_beam_step(torch.from_numpy(lg), torch.from_numpy(sc), torch.from_numpy(st),
                                 t, beam_width=0)
        """, "ValueError", "beam_width must be >= 1; got 0"),
    Case("step_beam_wide_is_padding", """
        t = trie(); lg, sc, st = step_inputs(t)
        out = sf.constrained_beam_step(torch.from_numpy(lg), torch.from_numpy(sc),
                                       torch.from_numpy(st), t, beam_width=5000)
        n = len(np.unique(CODES[:, 0]))
        assert (out.token[:, :n] >= 0).all() and (out.token[:, n:] == -1).all()
        assert torch.isneginf(out.scores[:, n:]).all()
        """),
    Case("step_binding_beam_2pow62", """
        t = trie(); lg, sc, st = step_inputs(t)
        _core.constrained_beam_step(lg, sc, st, t.child_offsets.numpy(), t.child_tokens.numpy(),
                                    t.child_nodes.numpy(), None, 2**62, 0, False)
        """, "ValueError", "outputs are too large to allocate"),
    Case("step_binding_ptr_beam_2pow62", """
        t = trie(); lg, sc, st = (torch.from_numpy(a) for a in step_inputs(t))
        _core.constrained_beam_step_ptr(lg.data_ptr(), 2, 3, t.codebook_size, lg.stride(0),
                                        lg.stride(1), sc.data_ptr(), st.data_ptr(),
                                        t.child_offsets.numpy(), t.child_tokens.numpy(),
                                        t.child_nodes.numpy(), 0, 0, 2**62, 0, False)
        """, "ValueError", "outputs are too large to allocate"),
]

# ---------------------------------------------------------------------------- item index, APF
INDEX = [
    Case("index_prefix_code_2pow40", "sf.ItemIndex(EMB[:2], np.array([0, 2**40]))", "ValueError",
         r"num_buckets=1099511627777 \(1-d prefix_codes .* the largest is 1099511627776\): "
         r".* would need"),
    Case("index_num_buckets_2pow62", "sf.ItemIndex(EMB, CODES[:, 0], num_buckets=2**62)",
         "ValueError", "num_buckets=4611686018427387904 .* would need"),
    Case("index_prefix_2d_huge_radix",
         "sf.ItemIndex(EMB[:2], np.array([[0, 2**40, 0], [2**40, 0, 2**40]]))", "ValueError",
         "too many to combine into one key"),
    Case("index_duplicate_ids", "sf.ItemIndex(EMB[:2], np.array([0, 1]), item_ids=[3, 3])",
         "ValueError", "item_ids must be unique"),
    Case("index_negative_ids", "sf.ItemIndex(EMB[:2], np.array([0, 1]), item_ids=[3, -3])",
         "ValueError", "item_ids must be >= 0"),
    Case("index_nan_row", "e = EMB.copy(); e[4, 1] = np.nan; sf.ItemIndex(e, CODES[:, 0])",
         "ValueError", "embeddings"),
    Case("index_binding_num_buckets_2pow62", """
        n, d = EMB.shape
        _core.item_index_build(EMB, CODES[:, 0].astype(np.int64), 2**62, None,
                               np.empty((n, d), np.float32), np.empty(7, np.int64),
                               np.empty(n, np.int64), np.empty(n, np.int64))
        """, "ValueError", r"offsets: expected shape \[4611686018427387905\]"),
    Case("index_edit_nan_row", """
        idx = index(); idx.embeddings[3, 0] = float("nan"); run_apf(idx)
        """, "ValueError", "embeddings must be finite unit-norm rows; row 3"),
    Case("index_edit_scaled_row", """
        idx = index(); idx.embeddings[5] *= 2; run_apf(idx)
        """, "ValueError", "row 5 has norm 2"),
    Case("index_edit_negative_id", """
        idx = index(); idx.item_ids[0] = -5; run_apf(idx)
        """, "ValueError", "item_ids must be >= 0; got -5"),
    Case("index_edit_duplicate_id", """
        idx = index(); idx.item_ids[0] = idx.item_ids[1]; run_apf(idx)
        """, "ValueError", "item_ids must be unique"),
    Case("index_edit_id_beyond_bound", """
        idx = index(); idx.item_ids[0] = 10**6; run_apf(idx)
        """, "ValueError", "item_ids must have max \\+ 1 = id_bound = 50"),
    Case("index_edit_offsets", """
        idx = index(); idx.offsets[1] = 10**9; run_apf(idx)
        """, "ValueError", "offsets must start at 0, be non-decreasing and end at 50"),
    Case("index_replaced_attribute", """
        idx = index(); ids = idx.item_ids.clone(); ids[2] = ids[3]; idx.item_ids = ids
        run_apf(idx)
        """, "ValueError", "item_ids must be unique"),
    Case("index_replaced_attribute_wrong_dtype", """
        idx = index(); idx.offsets = idx.offsets.to(torch.int32); run_apf(idx)
        """, "ValueError", r"offsets must be int64 \[7\]"),
    Case("index_edit_to_device_does_not_launder", """
        idx = index(); idx.embeddings[0, 0] = float("inf"); idx.to("cpu", torch.float32)
        """, "ValueError", "row 0"),
    Case("index_edit_valid_row_accepted", """
        idx = index()
        before = run_apf(idx)
        row = idx.embeddings[1].clone()
        idx.embeddings[0] = row                    # another unit row: a valid edit
        after = run_apf(idx)
        assert not idx._edited()
        ref = sf.apf_fuse(*apf_inputs(idx), idx, top_m=5, top_n=8, tau=0.05, backend="reference")
        assert np.array_equal(after[0], ref[0])
        """),
    Case("index_numpy_view_edit_needs_validate", """
        idx = index()
        idx.embeddings.numpy()[7, :] = 0.0         # behind torch's back
        idx.validate()
        """, "ValueError", "row 7 has norm 0"),
    Case("index_saved_tampered_id_bound", """
        d = saved(index(), "index_bound")
        edit_json(d / "item_index.json", id_bound=51)
        sf.ItemIndex.load(d)
        """, "ValueError", "item_ids must have max \\+ 1 = id_bound = 51"),
    Case("index_saved_flipped_byte", """
        d = saved(index(), "index_flip")
        flip_byte(d / "item_index.safetensors")
        sf.ItemIndex.load(d)
        """, "ValueError", "checksum mismatch"),
]
INDEX += _bad_config_cases("index", "index()", "item_index.json", "sf.ItemIndex.load", {
    "num_items": ["50", True], "dim": [8.0], "num_buckets": [0, None], "prefix_levels": [-1],
    "id_bound": ["50"], "tensors_sha256": [""],
})

APF = [
    Case("apf_tau_1e-30", "run_apf(tau=1e-30)", "ValueError",
         r"sigma_min / tau must be <= 2\^28 .* got sigma_min = 0.001, tau = 1e-30"),
    Case("apf_tau_1e-30_fixed", "run_apf(tau=1e-30, adaptive=False)", "ValueError",
         r"tau must give t = 1 / tau in \[2\^-28, 2\^28\]"),
    Case("apf_tau_1e30_fixed", "run_apf(tau=1e30, adaptive=False)", "ValueError",
         r"tau must give t = 1 / tau in .* got tau = 1e\+30"),
    Case("apf_sigma_min_1e300", "run_apf(sigma_min=1e300)", "ValueError",
         r"sigma_min / tau must be <= 2\^28"),
    Case("apf_sigma_min_zero_single_beam", """
        idx = index(); p, pids, q = apf_inputs(idx, k=1)
        sf.apf_fuse(p, pids, q, idx, top_m=5, top_n=8, tau=0.05, sigma_min=0.0)
        """, "ValueError", r"request 0 has temperature t_b = .* = 0, outside .* give "
                           r"sigma_min > 0"),
    Case("apf_huge_prefix_spread", """
        idx = index(); p, pids, q = apf_inputs(idx)
        p[1, 0] = -1e30
        sf.apf_fuse(p, pids, q, idx, top_m=5, top_n=8, tau=0.05)
        """, "ValueError", r"request 1 has temperature t_b = max\(std\(prefix_scores\[1\]\)"),
    Case("apf_t_at_upper_bound_ok", """
        res = run_apf(tau=2.0**-28, adaptive=False)
        ref = run_apf(tau=2.0**-28, adaptive=False, backend="reference")
        assert np.array_equal(res[0], ref[0])
        """),
    Case("apf_t_just_above_upper_bound", "run_apf(tau=2.0**-28 * 0.999, adaptive=False)",
         "ValueError", "tau must give t"),
    Case("apf_t_at_lower_bound_ok", "run_apf(tau=2.0**28, adaptive=False)"),
    Case("apf_phi_order_survives_large_t", """
        # t near the bound: the best item of each bucket keeps its prefix score (no collapse
        # to log P = 0), on every backend
        idx = index(); p, pids, q = apf_inputs(idx, b=2, k=3)
        for backend in ("cpu", "reference"):
            ids, logp, src = sf.apf_fuse(p, pids, q, idx, top_m=5, top_n=3, tau=2.0**-27,
                                         adaptive=False, backend=backend, dedup=False)
            for b in range(2):
                best = logp[b][src[b] >= 0]
                assert np.allclose(np.sort(best)[::-1][:len(best)],
                                   np.sort(p[b][np.unique(src[b][src[b] >= 0])])[::-1][:len(best)],
                                   atol=1e-5), (backend, logp[b], p[b])
        """),
    Case("apf_top_n_2pow62", "run_apf(top_n=2**62)", "ValueError",
         r"top_n=4611686018427387904 for B=3 requests: the outputs .* would need"),
    Case("apf_top_n_1e9", "run_apf(top_n=10**9)", "ValueError", "would need 55.9 GiB"),
    Case("apf_top_m_2pow62_buckets", "run_apf(top_m=2**62, return_buckets=True)", "ValueError",
         r"top_m=4611686018427387904 with return_buckets .* would need"),
    Case("apf_top_m_2pow62_no_buckets", """
        a = run_apf(top_m=2**62)
        b = run_apf(top_m=50)
        for x, y in zip(a, b):
            assert np.array_equal(x, y)
        """),
    Case("apf_binding_top_n_2pow62", """
        idx = index(); p, pids, q = apf_inputs(idx)
        out = [np.empty((3, 8), t) for t in (np.int64, np.float32, np.int64)]
        _core.apf_fuse(p, pids.astype(np.int64), q, idx.embeddings.numpy(), idx.offsets.numpy(),
                       idx.item_ids.numpy(), None, 5, 2**62, 0.05, True, 1e-3, False, True, *out)
        """, "ValueError", r"out_ids: expected shape \[3, 4611686018427387904\]"),
    Case("apf_binding_top_m_2pow62", """
        idx = index(); p, pids, q = apf_inputs(idx)
        out = [np.empty((3, 8), t) for t in (np.int64, np.float32, np.int64)]
        _core.apf_fuse(p, pids.astype(np.int64), q, idx.embeddings.numpy(), idx.offsets.numpy(),
                       idx.item_ids.numpy(), None, 2**62, 8, 0.05, True, 1e-3, False, True, *out)
        assert (out[0] >= -1).all()
        """),
    Case("apf_padding_never_has_real_id", """
        idx = index()
        for seed in range(20):
            r = np.random.default_rng(seed)
            p, pids, q = apf_inputs(idx, b=4, k=3, seed=seed)
            p[r.random(p.shape) < 0.4] = -np.inf
            mask = r.random(idx.id_bound) < 0.3
            for backend in ("cpu", "reference"):
                ids, logp, src = sf.apf_fuse(p, pids, q, idx, top_m=4, top_n=12, tau=0.07,
                                             allowed=mask, backend=backend)
                pad = np.isneginf(logp)
                assert np.array_equal(pad, ids == -1) and np.array_equal(pad, src == -1)
                assert np.isfinite(logp[~pad]).all()
                assert mask[ids[~pad]].all()
        """),
    Case("apf_nan_prefix_score",
         "idx = index(); p, pids, q = apf_inputs(idx); p[0, 1] = np.nan; "
         "sf.apf_fuse(p, pids, q, idx, top_m=3, top_n=4, tau=0.1)", "ValueError",
         r"prefix_scores must be finite or -inf .* got nan at index \[0, 1\]"),
    Case("apf_tau_str", "run_apf(tau='0.1')", "TypeError", "tau must be a float; got str"),
    Case("apf_top_n_bool", "run_apf(top_n=True)", "TypeError", "top_n must be an int; got bool"),
]

GROUPS = {"rq": RQ, "trie_and_beam_step": TRIE, "item_index": INDEX, "apf": APF}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_adversarial_ops(group, tmp_path):
    failures = run_batch(GROUPS[group], PRELUDE, tmp_path)
    assert not failures, f"{len(failures)} of {len(GROUPS[group])} cases failed:\n\n" + \
        "\n\n".join(failures)

