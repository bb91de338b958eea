"""`prepare tabular`: users' CSV, Parquet and JSON-lines tables."""

import argparse
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bagpipe.datasets import cli
from bagpipe.datasets.format import DatasetError, list_parts, read_meta
from bagpipe.datasets.jagged import Bags
from bagpipe.datasets.tabular import make_columns, parse_multi_hot, prepare_tabular
from bagpipe.datasets.text import hash_spans, padded_words

HEADER = "user,clicked,price,age,country,title,genres"
SHOP = [
    'u1,1,12.5,34,US,"Shoes, red",action|comedy',
    "u2,0,,27,DE,Hat,drama",
    'u3,1,7,,US,"Socks, ""warm""",comedy|drama|action',
    "u1,0,abc,40,FR,Hat,",  # line 5: price is not a number
    "u4,,3.25,22,US,Scarf,action",  # line 6: no label
    "u2,1,100,31,NULL,\"Coat, long\",comedy",
    "",  # line 8: blank
    "u5,0,1e3, 45 ,DE,Hat,drama|drama",
    "u6,1,2,19,US,Cap",  # line 10: one field short
]
EVAL = ["u1,1,15,34,US,Hat,action", "u9,0,4,50,JP,Gloves,horror|comedy"]
ROLES = dict(label="clicked", dense=["price", "age"], sparse=["user", "country", "title"], multi_hot={"genres": "|"})


def write(path, lines, header=HEADER):
    path.write_text("\n".join([header, *lines]) + "\n")
    return str(path)


def table(out, part=0):
    return pq.read_table(list_parts(out)[part])


def bags(out, column, part=0):
    return Bags.from_arrow(table(out, part).column(column)).to_lists()


def key(text):
    data = text.encode()
    return int(hash_spans(padded_words(data), np.array([0]), np.array([len(data)]))[0])


def leftovers(directory):
    return [n for n in os.listdir(directory) if ".tmp" in n]


@pytest.fixture
def shop(tmp_path):
    return write(tmp_path / "shop.csv", SHOP), write(tmp_path / "shop_eval.csv", EVAL)


def test_csv_skip_policy(tmp_path, shop):
    r = prepare_tabular(list(shop), str(tmp_path / "out"), on_bad_line="skip", **ROLES)
    assert r.part_rows == [5, 2] and r.bad_lines == 3 and r.info["blank_lines"] == 1
    train_csv = shop[0]
    assert r.bad_examples == [
        f"{train_csv}:5: column 'price': 'abc' is not a number",
        f"{train_csv}:6: column 'clicked': missing label",
        f"{train_csv}:10: expected 7 comma-separated fields, got 6",
    ]
    meta = read_meta(r.out)
    assert meta.source == "tabular" and meta.dense_features == ["price", "age"]
    assert meta.sparse_features == ["user", "country", "title", "genres"] and meta.multi_hot == ["genres"]
    assert meta.preprocessing["eval_split"] == "last part"
    t = table(r.out)
    assert t.column("label").to_pylist() == [1, 0, 1, 1, 0]
    # missing -> 0, then log(1 + x); " 45 " parses, 1e3 too
    assert np.allclose(t.column("price").to_numpy(), np.log1p([12.5, 0, 7, 100, 1000]))
    assert np.allclose(t.column("age").to_numpy(), np.log1p([34, 27, 0, 31, 45]))
    title = t.column("title").to_pylist()  # the quoted commas are one value each
    assert len(set(title)) == 4 and title[1] == title[4] and 0 not in title
    assert t.column("country").to_pylist()[3] == 0  # NULL: missing
    genres = bags(r.out, "genres")
    action, comedy, drama = genres[0][0], genres[0][1], genres[1][0]
    assert genres == [[action, comedy], [drama], [comedy, drama, action], [comedy], [drama, drama]]
    assert bags(r.out, "genres", 1) == [[action], [0, comedy]]  # 'horror' is out of vocabulary
    assert table(r.out, 1).column("user").to_pylist()[1] == 0  # unseen user
    assert r.cardinalities == [5, 3, 5, 4]  # 4 users, 2 countries, 4 titles, 3 genres (+ id 0 each)


def test_csv_error_policy_names_file_line_column_and_leaves_nothing(tmp_path, shop):
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=r"shop.csv:5: column 'price': 'abc' is not a number"):
        prepare_tabular(list(shop), str(out), **ROLES)
    assert not out.exists() and not leftovers(tmp_path)
    only_short = write(tmp_path / "short.csv", [SHOP[0], SHOP[-1], SHOP[1]])
    with pytest.raises(DatasetError, match=r"short.csv:3: expected 7 comma-separated fields, got 6"):
        prepare_tabular([only_short], str(out), **ROLES)
    no_label = write(tmp_path / "nolabel.csv", [SHOP[0], SHOP[4]])
    with pytest.raises(DatasetError, match=r"nolabel.csv:3: column 'clicked': missing label"):
        prepare_tabular([no_label], str(out), hash_buckets=8, **ROLES)  # one pass: found while writing
    assert not out.exists() and not leftovers(tmp_path)


def test_line_numbers_across_blocks(tmp_path):
    """Rejected rows and value errors in many small blocks are named by their exact lines."""
    lines, bad_at = [], []
    for i in range(2, 1500):
        if i % 97 == 0:
            lines.append(f"{i},1,x")  # too many fields
            bad_at.append(i)
        elif i % 89 == 0:
            lines.append(f"{i},oops")
            bad_at.append(i)
        else:
            lines.append(f"{i},{i % 2}")
    src = write(tmp_path / "many.csv", lines, header="id,y")
    r = prepare_tabular([src], str(tmp_path / "out"), label="y", sparse=["id"], on_bad_line="skip",
                        block_bytes=1024, hash_buckets=1 << 20)
    assert r.bad_lines == len(bad_at)
    assert [int(e.split(":")[1]) for e in r.bad_examples] == bad_at[:5]
    assert r.rows == 1498 - len(bad_at)
    assert table(r.out).column("label").to_pylist() == [i % 2 for i in range(2, 1500) if i not in bad_at]
    with pytest.raises(DatasetError, match=rf"many.csv:{bad_at[0]}: column 'y': 'oops' is not a number"):
        prepare_tabular([src], str(tmp_path / "err"), label="y", sparse=["id"], block_bytes=1024, hash_buckets=64)


def test_vocabulary_min_count_and_oov(tmp_path):
    src = write(tmp_path / "t.csv", ["1,a", "0,b", "1,a", "0,c", "1, a ", "0,b"], header="y,c")
    ev = write(tmp_path / "e.csv", ["1,a", "0,z", "1,b", "0,"], header="y,c")
    r = prepare_tabular([src, ev], str(tmp_path / "v"), label="y", sparse=["c"], min_count=2)
    assert r.cardinalities == [3]  # a (3 times, spaces trimmed) and b (twice); c is rare
    ids = table(r.out).column("c").to_pylist()
    a, b = ids[0], ids[1]
    assert sorted([a, b]) == [1, 2] and (a < b) == (key("a") < key("b"))  # ids by increasing key
    assert ids == [a, b, a, 0, a, b]
    assert table(r.out, 1).column("c").to_pylist() == [a, 0, b, 0]  # unseen and missing -> 0
    assert read_meta(r.out).preprocessing["sparse"]["ids"]["min_count"] == 2


def test_hash_buckets(tmp_path):
    src = write(tmp_path / "t.csv", ["1,apple,x|y", "0,pear,", "1,apple,y", "0,NA,z|x"], header="y,fruit,tags")
    r = prepare_tabular([src], str(tmp_path / "h"), label="y", sparse=["fruit"], multi_hot={"tags": "|"},
                        hash_buckets=1000)
    assert r.cardinalities == [1000, 1000]
    assert table(r.out).column("fruit").to_pylist() == [key("apple") % 1000, key("pear") % 1000,
                                                        key("apple") % 1000, 0]
    assert bags(r.out, "tags") == [[key("x") % 1000, key("y") % 1000], [], [key("y") % 1000],
                                   [key("z") % 1000, key("x") % 1000]]
    assert read_meta(r.out).preprocessing["sparse"]["ids"] == {"mode": "hash", "buckets": 1000, "rule": "key % buckets"}


def test_dense_transforms(tmp_path):
    src = write(tmp_path / "t.csv", ["1,a,2", "0,a,", "1,b,-3", "0,b,10"], header="y,c,x")
    ev = write(tmp_path / "e.csv", ["1,a,100"], header="y,c,x")
    raw = np.array([2, 0, -3, 10], dtype=np.float64)
    kw = dict(label="y", dense=["x"], sparse=["c"])
    logs = prepare_tabular([src, ev], str(tmp_path / "log"), **kw)
    assert np.allclose(table(logs.out).column("x").to_numpy(), np.log1p(np.maximum(raw, 0)))
    none = prepare_tabular([src, ev], str(tmp_path / "none"), dense_transform="none", **kw)
    assert table(none.out).column("x").to_pylist() == raw.tolist()
    std = prepare_tabular([src, ev], str(tmp_path / "std"), dense_transform="standardize", **kw)
    stats = read_meta(std.out).preprocessing["dense"]
    assert stats["mean"] == [raw.mean()] and np.isclose(stats["std"][0], raw.std())  # training rows only
    x = table(std.out).column("x").to_numpy()
    assert np.isclose(x.mean(), 0, atol=1e-6) and np.isclose(x.std(), 1, atol=1e-6)
    assert np.isclose(table(std.out, 1).column("x").to_numpy()[0], (100 - raw.mean()) / raw.std())


def test_label_threshold_and_binary_labels(tmp_path):
    src = write(tmp_path / "r.csv", ["5,m1", "3,m2", "4,m1", "1.5,m3"], header="rating,movie")
    r = prepare_tabular([src], str(tmp_path / "r"), label="rating", sparse=["movie"], label_threshold=4)
    assert table(r.out).column("label").to_pylist() == [1, 0, 1, 0]
    with pytest.raises(DatasetError, match=r"r.csv:2: column 'rating': '5' is not 0 or 1"):
        prepare_tabular([src], str(tmp_path / "bin"), label="rating", sparse=["movie"])
    words = write(tmp_path / "w.csv", ["true,a", "False,b", "1.0,c", "0,d"], header="y,c")
    assert table(prepare_tabular([words], str(tmp_path / "w"), label="y", sparse=["c"]).out) \
        .column("label").to_pylist() == [1, 0, 1, 0]


def test_eval_split_last_input_or_seeded_fraction(tmp_path):
    lines = [f"{i % 2},{i % 13},{i}" for i in range(3000)]
    a = write(tmp_path / "a.csv", lines[:2000], header="y,c,x")
    b = write(tmp_path / "b.csv", lines[2000:], header="y,c,x")
    kw = dict(label="y", dense=["x"], sparse=["c"], dense_transform="none")
    last = prepare_tabular([a, b], str(tmp_path / "last"), **kw)
    assert last.part_rows == [2000, 1000]
    frac = prepare_tabular([a, b], str(tmp_path / "f1"), eval_fraction=0.2, seed=3, **kw)
    assert len(frac.parts) == 2 and sum(frac.part_rows) == 3000 and 500 < frac.part_rows[1] < 700
    info = read_meta(frac.out).preprocessing["eval_split"]
    assert info["fraction"] == 0.2 and info["seed"] == 3
    eval_x = sorted(table(frac.out, 1).column("x").to_pylist())
    again = prepare_tabular([a, b], str(tmp_path / "f2"), eval_fraction=0.2, seed=3, block_bytes=1024, **kw)
    assert sorted(table(again.out, 1).column("x").to_pylist()) == eval_x  # block size changes nothing
    other = prepare_tabular([a, b], str(tmp_path / "f3"), eval_fraction=0.2, seed=4, **kw)
    assert sorted(table(other.out, 1).column("x").to_pylist()) != eval_x
    train_x = table(frac.out, 0).column("x").to_pylist()
    assert sorted(train_x + eval_x) == list(range(3000))
    with pytest.raises(DatasetError, match="eval fraction must be in"):
        prepare_tabular([a], str(tmp_path / "bad"), eval_fraction=1.0, **kw)


def test_parquet_input(tmp_path):
    src = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({
        "rating": [5, 3, 4, None, 1],
        "age": [1.5, None, float("nan"), 2.0, 3.0],
        "movie": pa.array(["a", "b", "a", "c", "b"]).dictionary_encode(),
        "tags": [["x", "y"], None, [], ["x"], ["z", "x"]],
        "ignored": [{"k": 1}] * 5,
    }), src)
    r = prepare_tabular([src], str(tmp_path / "p"), label="rating", label_threshold=4, dense=["age"],
                        sparse=["movie"], multi_hot={"tags": "|"}, dense_transform="none", on_bad_line="skip")
    assert r.bad_examples == [f"{src}: row 4: column 'rating': missing label"]
    t = table(r.out)
    assert t.column("label").to_pylist() == [1, 0, 1, 0]
    assert t.column("age").to_pylist() == [1.5, 0.0, 0.0, 3.0]  # null and NaN are missing
    movie = t.column("movie").to_pylist()
    assert movie[0] == movie[2] != movie[1] == movie[3]
    tags = bags(r.out, "tags")  # a list column is a bag already; null and [] are empty bags
    x, y = tags[0]
    assert len(tags[3]) == 2 and tags[3][1] == x and len({x, y, tags[3][0]}) == 3 and tags[1:3] == [[], []]
    with pytest.raises(DatasetError, match=r"in.parquet: column 'tags' holds a list; expected one value"):
        prepare_tabular([src], str(tmp_path / "q"), label="rating", sparse=["tags"])
    with pytest.raises(DatasetError, match=r"in.parquet: no column 'genre' in the schema"):
        prepare_tabular([src], str(tmp_path / "q"), label="rating", sparse=["genre"])
    assert not (tmp_path / "q").exists()


def test_jsonl_input(tmp_path):
    rows = [
        {"y": 1, "price": 12.5, "country": "US", "genres": ["action", "comedy"], "extra": {"x": 1}},
        {"y": False, "price": "7", "country": 49, "genres": "drama|comedy"},
        None,  # a blank line
        {"y": True, "price": None, "country": "DE"},
        '{"y": 1, "price": 3} {"y": 0}',
        {"y": 1, "price": [1], "country": "US"},
        "not json",
        {"y": 0, "price": 2, "country": "FR", "genres": []},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join("" if r is None else r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    r = prepare_tabular([str(src)], str(tmp_path / "j"), label="y", dense=["price"], sparse=["country"],
                        multi_hot={"genres": "|"}, on_bad_line="skip", block_bytes=1024)
    assert r.bad_examples == [
        f"{src}:5: more than one JSON value on a line",
        f"{src}:6: column 'price' holds a list; expected one value (give it with --multi-hot COL=SEP if it is a bag)",
        f"{src}:7: not a JSON object with usable values (Invalid value.)",
    ]
    t = table(r.out)
    assert t.column("label").to_pylist() == [1, 0, 1, 0]
    assert np.allclose(t.column("price").to_numpy(), np.log1p([12.5, 7, 0, 2]))
    g = bags(r.out, "genres")  # a JSON list, a split string, a missing field, an empty list
    assert [len(b) for b in g] == [2, 2, 0, 0]
    assert g[0][1] == g[1][1] and len(set(g[0] + g[1])) == 3  # comedy both ways
    with pytest.raises(DatasetError, match=r"in.jsonl:5: more than one JSON value on a line"):
        prepare_tabular([str(src)], str(tmp_path / "k"), label="y", sparse=["country"])
    with pytest.raises(DatasetError, match=r"no line has the field 'colour'"):
        prepare_tabular([str(src)], str(tmp_path / "k"), label="y", sparse=["colour"], on_bad_line="skip")
    assert not (tmp_path / "k").exists() and not leftovers(tmp_path)


def test_roles_and_inputs_checked_before_output(tmp_path, shop):
    out = tmp_path / "o"
    with pytest.raises(DatasetError, match=r"shop.csv: no column 'colour' in the header"):
        prepare_tabular(list(shop), str(out), label="clicked", sparse=["colour"])
    with pytest.raises(DatasetError, match="given more than once"):
        make_columns("clicked", ["price"], ["price"])
    with pytest.raises(DatasetError, match="no sparse or multi-hot columns"):
        make_columns("clicked", ["price"], [])
    with pytest.raises(DatasetError, match="may not be named 'label'"):
        make_columns("y", ["label"], ["c"])
    with pytest.raises(DatasetError, match="cannot tell the format"):
        prepare_tabular([write(tmp_path / "x.dat", ["1,a"], header="y,c")], str(out), label="y", sparse=["c"])
    with pytest.raises(DatasetError, match="excludes min_count"):
        prepare_tabular(list(shop), str(out), hash_buckets=10, min_count=2, **ROLES)
    assert not out.exists()
    assert parse_multi_hot("genres=|,tags=;") == {"genres": "|", "tags": ";"}
    assert parse_multi_hot("tags=,,genres=|") == {"tags": ",", "genres": "|"}
    with pytest.raises(DatasetError, match="COL=SEP"):
        parse_multi_hot("genres")


def _run(argv):
    parser = argparse.ArgumentParser(prog="bagpipe")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_both_policies(tmp_path, shop, capsys):
    out = str(tmp_path / "cli")
    argv = ["prepare", "tabular", "--input", *shop, "--out", out, "--label", "clicked", "--dense", "price,age",
            "--sparse", "user,country,title", "--multi-hot", "genres=|", "--no-progress"]
    assert _run(argv) == 2
    assert "error: " in capsys.readouterr().err and not os.path.exists(out) and not leftovers(tmp_path)
    assert _run(argv + ["--on-bad-line", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 parts (7 rows)" in printed and "skipped 3 bad lines" in printed and "1 blank lines" in printed
    assert _run(argv + ["--on-bad-line", "skip"]) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert _run(argv + ["--on-bad-line", "skip", "--overwrite", "--hash-buckets", "64", "--eval-fraction", "0.5",
                        "--seed", "1", "--dense-transform", "standardize", "--pooling", "mean"]) == 0
    meta = read_meta(out)
    assert meta.cardinalities == [64] * 4 and meta.tables[3].pooling == "mean"
