import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets.criteo import prepare_criteo
from bagpipe.datasets.format import DatasetError, list_parts, read_meta
from bagpipe.datasets.synthetic import generate_synthetic
from bagpipe.datasets.text import KeyCounter, LineBlock, parse_dec, parse_hex


def line(label="0", dense=None, cats=None):
    dense = dense if dense is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *dense, *cats])


def write(path, lines, newline="\n", trailing=True):
    text = newline.join(lines) + (newline if trailing else "")
    path.write_bytes(text.encode())
    return str(path)


def table(path):
    return pq.read_table(list_parts(path)[0])


def test_edge_cases_parse(tmp_path):
    dense = ["", "-2", "0", "7", "", "1", "123456789012", "3", "", "", "", "", "5"]
    cats = ["", "DEADBEEF", "deadbeef", "0000000a", "A", "ffffffffffffffff"] + [""] * 20
    lines = [line("1", dense, cats), line("0")]
    for newline, trailing in (("\n", True), ("\n", False), ("\r\n", True), ("\r\n", False)):
        out = tmp_path / f"out{len(newline)}{trailing}"
        src = write(tmp_path / f"in{len(newline)}{trailing}.txt", lines, newline, trailing)
        r = prepare_criteo([src], str(out), max_ind_range=1 << 40)
        assert r.rows == 2 and r.bad_lines == 0
        t = table(str(out))
        assert t.column("label").to_numpy().tolist() == [1.0, 0.0]
        i = [t.column(f"I{j + 1}").to_numpy()[0] for j in range(13)]
        expect = np.log1p(np.array([0, 0, 0, 7, 0, 1, 123456789012, 3, 0, 0, 0, 0, 5], dtype=np.float64))
        assert np.array_equal(np.array(i, dtype=np.float32), expect.astype(np.float32))
        c = [int(t.column(f"C{j + 1}").to_numpy()[0]) for j in range(6)]
        assert c == [0, 0xDEADBEEF, 0xDEADBEEF, 10, 10, 0xFFFFFFFFFFFFFFFF % (1 << 40)]
        assert t.column("C7").to_numpy()[1] == 6


def test_modulo_and_vocabulary_modes(tmp_path):
    vals = ["00000005", "0000000f", "00000005", "00000010", "", "0000000f", "00000005"]
    lines = [line(str(k % 2), cats=[v] + [f"{k:08x}"] * 25) for k, v in enumerate(vals)]
    src = write(tmp_path / "a.txt", lines)
    r = prepare_criteo([src], str(tmp_path / "mod"), max_ind_range=10)
    assert r.cardinalities == [10] * 26
    assert table(str(tmp_path / "mod")).column("C1").to_numpy().tolist() == [5, 5, 5, 6, 0, 5, 5]
    meta = read_meta(str(tmp_path / "mod"))
    assert meta.source == "criteo" and meta.preprocessing["max_ind_range"] == 10
    assert meta.preprocessing["inputs"] == ["a.txt"]
    # vocabulary: ids 1..V in hex order, missing -> 0
    r = prepare_criteo([src], str(tmp_path / "voc"))
    assert r.cardinalities[0] == 4 and r.cardinalities[1] == 8
    assert table(str(tmp_path / "voc")).column("C1").to_numpy().tolist() == [1, 2, 1, 3, 0, 2, 1]
    # frequency threshold: values seen < 2 times -> 0
    r = prepare_criteo([src], str(tmp_path / "voc2"), min_count=2)
    assert r.cardinalities[0] == 3 and r.cardinalities[1] == 1
    assert table(str(tmp_path / "voc2")).column("C1").to_numpy().tolist() == [1, 2, 1, 0, 0, 2, 1]
    assert (table(str(tmp_path / "voc2")).column("C2").to_numpy() == 0).all()
    with pytest.raises(DatasetError, match="min_count"):
        prepare_criteo([src], str(tmp_path / "x"), max_ind_range=10, min_count=2)


BAD = [
    ("\t".join(["0"] * 39), "expected 40 tab-separated fields, got 39"),
    (line(cats=["xyz"] + ["0"] * 25), "C1 'xyz' is not a hexadecimal"),
    (line(dense=["1.5"] + ["0"] * 12), "I1 '1.5' is not an integer"),
    (line(dense=["0"] * 12 + ["-"]), "I13 '-' is not an integer"),
    (line(label="2"), "label '2' is not 0 or 1"),
    ("", "empty line"),
    (line(cats=["0"] * 25 + ["12345678901234567"]), "C26"),
]


@pytest.mark.parametrize("bad,reason", BAD)
def test_bad_line_error_names_file_line_reason(tmp_path, bad, reason):
    src = write(tmp_path / "day.txt", [line(), line(), bad, line()])
    out = tmp_path / "out"
    for mode in ({}, {"max_ind_range": 100}):
        with pytest.raises(DatasetError) as err:
            prepare_criteo([src], str(out), **mode)
        assert f"day.txt:3: {reason}" in str(err.value)
        assert sorted(os.listdir(tmp_path)) == ["day.txt"]  # nothing left behind


def test_bad_lines_skip_reports_count_and_examples(tmp_path):
    good = [line(str(i % 2)) for i in range(10)]
    lines = good[:3] + [b for b, _ in BAD] + good[3:]
    src = write(tmp_path / "d0.txt", lines)
    src2 = write(tmp_path / "d1.txt", good[:2] + [BAD[0][0]])
    for mode in ({}, {"max_ind_range": 100}):
        out = tmp_path / f"out{len(mode)}"
        r = prepare_criteo([src, src2], str(out), on_bad_line="skip", **mode)
        assert r.part_rows == [10, 2] and r.rows == 12
        assert r.bad_lines == len(BAD) + 1
        assert len(r.bad_examples) == 5
        assert r.bad_examples[0].endswith("d0.txt:4: expected 40 tab-separated fields, got 39")
        assert "skipped 8 bad lines" in r.summary()
        t = table(str(out))
        assert t.column("label").to_numpy().tolist() == [float(i % 2) for i in range(10)]


def test_block_boundaries_do_not_matter(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for k in range(300):
        dense = [str(int(x)) if x >= 0 else "" for x in rng.integers(-3, 10**int(rng.integers(1, 12)), 13)]
        cats = [f"{int(x):x}" if x % 5 else "" for x in rng.integers(0, 2**32, 26)]
        lines.append(line(str(k % 2), dense, cats))
    lines[137] = "1\tbroken"
    src = write(tmp_path / "x.txt", lines, trailing=False)
    ref = prepare_criteo([src], str(tmp_path / "ref"), on_bad_line="skip")
    for bb in (64, 1000, 4096):
        r = prepare_criteo([src], str(tmp_path / f"b{bb}"), on_bad_line="skip", block_bytes=bb)
        assert r.bad_lines == 1 and r.bad_examples == ref.bad_examples
        assert r.bad_examples[0].endswith("x.txt:138: expected 40 tab-separated fields, got 2")
        assert table(str(tmp_path / f"b{bb}")).equals(table(str(tmp_path / "ref")))
    with pytest.raises(DatasetError, match=r"x.txt:138: "):
        prepare_criteo([src], str(tmp_path / "err"), block_bytes=100)


def test_existing_output_and_missing_input(tmp_path):
    src = write(tmp_path / "a.txt", [line()])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DatasetError, match="already exists"):
        prepare_criteo([src], str(out))
    assert (out / "keep.txt").read_text() == "precious"
    r = prepare_criteo([src], str(out), overwrite=True)
    assert os.listdir(r.out) == ["part-00000.parquet"]
    with pytest.raises(DatasetError, match="nope.txt: input file does not exist"):
        prepare_criteo([str(tmp_path / "nope.txt")], str(tmp_path / "o2"))
    # a failure with overwrite leaves the old dataset in place
    bad = write(tmp_path / "bad.txt", ["junk"])
    with pytest.raises(DatasetError):
        prepare_criteo([bad], str(out), overwrite=True)
    assert os.listdir(out) == ["part-00000.parquet"]


def test_synthetic_tsv_round_trip(tmp_path):
    tables = [500, 40, 7, 1, 3000] + [20] * 21
    kw = dict(seed=9, tables=tables, rows_per_part=2500, eval_rows=500)
    pq_ds = generate_synthetic(str(tmp_path / "pq"), 5000, **kw)
    tsv = generate_synthetic(str(tmp_path / "tsv"), 5000, format="criteo-tsv", **kw)
    txt = sorted(p for p in tsv.parts)
    r = prepare_criteo(txt, str(tmp_path / "back"))
    assert r.part_rows == [2500, 2500, 500]
    for p_ref, p_back in zip(list_parts(pq_ds.out), list_parts(r.out)):
        a, b = pq.read_table(p_ref), pq.read_table(p_back)
        assert a.num_rows == b.num_rows
        assert np.array_equal(a.column("label").to_numpy(), b.column("label").to_numpy())
        for j in range(13):  # bit-identical preprocessing
            assert np.array_equal(a.column(f"I{j + 1}").to_numpy(), b.column(f"I{j + 1}").to_numpy())
        for t in range(26):
            x, y = a.column(f"C{t + 1}").to_numpy(), b.column(f"C{t + 1}").to_numpy()
            assert np.array_equal(x == 0, y == 0)  # missing <-> id 0
            pairs = np.unique(np.stack([x, y]), axis=1)
            # a bijection between generator ids and vocabulary ids
            assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
    r2 = prepare_criteo(txt, str(tmp_path / "back_mod"), max_ind_range=97)
    assert r2.rows == 5500


def test_field_parsers_directly():
    text = b"12\t-7\t\t99999999\t123456789\t0x1\t+5\n"
    blk = LineBlock(text, 1)
    good, bounds = blk.split(9, 7)
    fs, fe = bounds[:7, 0] + 1, bounds[1:, 0]
    v, miss, bad = parse_dec(blk, fs, fe)
    assert v[[0, 1, 3, 4]].tolist() == [12, -7, 99999999, 123456789]
    assert miss.tolist() == [False, False, True, False, False, False, False]
    assert bad.tolist() == [False, False, False, False, False, True, True]
    h, miss, bad = parse_hex(blk, fs, fe)
    assert h[[0, 3]].tolist() == [0x12, 0x99999999]
    assert bad.tolist() == [False, True, False, False, False, True, True]


def test_key_counter_merges_exactly():
    rng = np.random.default_rng(3)
    c = KeyCounter()
    allk = []
    for _ in range(30):
        k = rng.integers(0, 5000, rng.integers(0, 100000)).astype(np.uint64)
        c.add(k)
        allk.append(k)
    ref_k, ref_c = np.unique(np.concatenate(allk), return_counts=True)
    assert np.array_equal(c.vocabulary(1), ref_k)
    assert np.array_equal(c.vocabulary(20), ref_k[ref_c >= 20])


def test_threads_do_not_change_output(tmp_path):
    tsv = generate_synthetic(str(tmp_path / "tsv"), 3000, seed=2, tables=[300] * 26, format="criteo-tsv",
                             rows_per_part=2000)
    outs = []
    for threads in (1, 2):
        for kw in ({}, {"max_ind_range": 50}):
            out = tmp_path / f"o{threads}{len(kw)}"
            prepare_criteo(tsv.parts, str(out), threads=threads, block_bytes=20000, **kw)
            outs.append({p: open(p, "rb").read() for p in map(str, sorted(out.iterdir()))})
    assert [list(o.values()) for o in outs[:2]] == [list(o.values()) for o in outs[2:]]


def test_vocab_index_matches_binary_search():
    from bagpipe.datasets.text import VocabIndex, vocab_lookup

    rng = np.random.default_rng(5)
    for V in (0, 1, 7, 5000, 60000):
        vocab = np.unique(rng.integers(0, 2**63, V, dtype=np.int64).astype(np.uint64))
        keys = np.concatenate([vocab[rng.integers(0, max(len(vocab), 1), 4000)] if len(vocab) else
                               np.zeros(0, np.uint64), rng.integers(0, 2**63, 1000, dtype=np.int64).astype(np.uint64)])
        present = rng.random(len(keys)) < 0.8
        assert np.array_equal(VocabIndex(vocab).lookup(keys, present), vocab_lookup(vocab, keys, present))
