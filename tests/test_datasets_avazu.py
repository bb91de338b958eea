import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets.avazu import AVAZU_CATEGORICAL, SPARSE_FIELDS, prepare_avazu
from bagpipe.datasets.format import DatasetError, list_parts, read_meta

HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
          "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")


def row(rid, click, hour, site_id="1fbe01fe", device_ip="ddd2926e", c20="-1"):
    return (f"{rid},{click},{hour},1005,0,{site_id},f3845767,28905ebd,ecad2386,7801e8d9,07d7df22,a99f214a,"
            f"{device_ip},44956a24,1,2,15706,320,50,1722,0,35,{c20},79")


ROWS = [
    row(1, 0, 14102100),
    row(2, 1, 14102623, site_id="averyveryverylongsiteidentifier", device_ip="96809ac8"),
    row(3, 0, 14103005, site_id="", c20="100084"),
    row(4, 1, 14102100, site_id="averyveryverylongsiteidentifieX"),
    row(5, 0, 14102701, device_ip="96809ac8"),
]


def write(path, rows, header=HEADER):
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def column(out, name):
    return pq.read_table(list_parts(out)[0]).column(name).to_numpy()


def test_vocabulary_mode(tmp_path):
    src = write(tmp_path / "train.csv", ROWS)
    r = prepare_avazu([src], str(tmp_path / "out"))
    meta = read_meta(r.out)
    assert meta.num_dense == 0 and meta.num_tables == 23 and meta.source == "avazu"
    assert meta.preprocessing["sparse_fields"] == list(SPARSE_FIELDS)
    assert r.cardinalities[:2] == [24, 7]
    assert column(r.out, "label").tolist() == [0, 1, 0, 1, 0]
    # hour of day and day of week (2014-10-21 was a Tuesday -> 1; 10-26 Sunday -> 6)
    assert column(r.out, "C1").tolist() == [0, 23, 5, 0, 1]
    assert column(r.out, "C2").tolist() == [1, 6, 3, 1, 0]
    site = column(r.out, "C5")  # site_id: 3 distinct non-empty values + the empty one
    assert r.cardinalities[4] == 4
    assert site[2] == 0 and len({site[0], site[1], site[3]}) == 3 and site[4] == site[0]
    ip = column(r.out, "C12")
    assert ip[1] == ip[4] != ip[0]
    # every table's ids are in range
    for t, n in enumerate(r.cardinalities):
        ids = column(r.out, f"C{t + 1}")
        assert ids.min() >= 0 and ids.max() < n
    r2 = prepare_avazu([src], str(tmp_path / "out2"), min_count=2)
    assert column(r2.out, "C5").tolist() == [1, 0, 0, 0, 1]


def test_modulo_mode_and_column_order(tmp_path):
    names = HEADER.split(",")
    order = [names[k] for k in [2, 1] + list(range(3, 24))]  # no id, hour before click
    rows = []
    for line in ROWS:
        f = line.split(",")
        rows.append(",".join(f[names.index(n)] for n in order))
    src = write(tmp_path / "a.csv", rows, header=",".join(order))
    r = prepare_avazu([src], str(tmp_path / "out"), max_ind_range=16)
    assert r.cardinalities == [16, 7] + [16] * 21
    assert column(r.out, "label").tolist() == [0, 1, 0, 1, 0]
    assert column(r.out, "C1").tolist() == [0, 23 % 16, 5, 0, 1]
    assert column(r.out, "C5")[2] == 0
    assert column(r.out, "C5").max() < 16


def test_bad_lines(tmp_path):
    rows = ROWS[:2] + [row(9, 1, 14133100), row(10, 2, 14102100), "1,0,14102100,too,few"] + ROWS[2:]
    src = write(tmp_path / "bad.csv", rows)
    with pytest.raises(DatasetError, match=r"bad.csv:4: hour '14133100' is not a valid YYMMDDHH"):
        prepare_avazu([src], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    r = prepare_avazu([src], str(tmp_path / "out"), on_bad_line="skip", max_ind_range=100)
    assert r.rows == 5 and r.bad_lines == 3
    assert r.bad_examples[1].endswith("bad.csv:5: click '2' is not 0 or 1")
    assert r.bad_examples[2].endswith("bad.csv:6: expected 24 comma-separated fields, got 5")
    for bad_hour in ("1410210", "14022900", "14102124", "1410a100"):
        src = write(tmp_path / "h.csv", [row(1, 0, bad_hour)])
        with pytest.raises(DatasetError, match="h.csv:2: hour"):
            prepare_avazu([src], str(tmp_path / "o3"))


def test_header_errors(tmp_path):
    with pytest.raises(DatasetError, match="header lacks column"):
        prepare_avazu([write(tmp_path / "a.csv", [], header="id,click,hour")], str(tmp_path / "o"))
    with pytest.raises(DatasetError, match="unexpected column"):
        prepare_avazu([write(tmp_path / "b.csv", [], header=HEADER + ",extra")], str(tmp_path / "o"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        prepare_avazu([str(tmp_path / "empty.csv")], str(tmp_path / "o"))
    assert len(AVAZU_CATEGORICAL) == 21


def test_two_files_last_is_eval(tmp_path):
    a = write(tmp_path / "days.csv", ROWS[:4])
    b = write(tmp_path / "last.csv", ROWS[4:])
    r = prepare_avazu([a, b], str(tmp_path / "out"))
    assert r.part_rows == [4, 1] and len(list_parts(r.out)) == 2
    assert read_meta(r.out).preprocessing["inputs"] == ["days.csv", "last.csv"]
    from bagpipe.datasets.reader import BatchReader, split_parts

    train, ev = split_parts(r.out)
    batches = list(BatchReader(train, 2))
    assert len(batches) == 2 and batches[0].dense.shape == (2, 0) and batches[0].sparse.shape == (23, 2)
    assert batches[1].labels.tolist() == [0.0, 1.0]


def test_long_strings_hash_apart():
    from bagpipe.datasets.text import LineBlock, hash_fields

    vals = [b"", b"a", b"ab", b"abcdefgh", b"abcdefghi", b"abcdefgh\x00", b"x" * 17, b"x" * 16, b"x" * 40,
            b"x" * 39 + b"y"]
    blk = LineBlock(b",".join(vals) + b"\n", 1)
    good, bounds = blk.split(44, len(vals))
    h = hash_fields(blk, bounds[:-1, 0] + 1, bounds[1:, 0])
    assert len(np.unique(h)) == len(vals)
    blk2 = LineBlock(b"zz," + b",".join(vals) + b"\n", 1)
    _, b2 = blk2.split(44, len(vals) + 1)
    assert np.array_equal(hash_fields(blk2, b2[1:-1, 0] + 1, b2[2:, 0]), h)
