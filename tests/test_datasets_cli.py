import argparse
import json
import os

import pytest

from bagpipe.datasets import cli
from bagpipe.datasets.format import list_parts, read_meta


def run(argv):
    parser = argparse.ArgumentParser(prog="bagpipe")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_prepare_synthetic_and_stats(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert run(["prepare", "synthetic", "--out", out, "--rows", "3000", "--seed", "4",
                "--tables", "100,20,3", "--rows-per-part", "2000", "--no-progress"]) == 0
    assert "3000 train rows + 300 eval rows" in capsys.readouterr().out
    assert len(list_parts(out)) == 3
    assert read_meta(out).cardinalities == [100, 20, 3]
    assert run(["stats", out, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["rows"] == 3300 and len(st["tables"]) == 3
    assert run(["stats", out]) == 0
    assert "hottest 1%" in capsys.readouterr().out


def test_default_table_scale(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert run(["prepare", "synthetic", "--out", out, "--rows", "500", "--eval-rows", "0", "--no-progress"]) == 0
    meta = read_meta(out)
    assert meta.preprocessing["table_scale"] == cli.CLI_TABLE_SCALE
    assert meta.cardinalities[2] == round(10131227 * cli.CLI_TABLE_SCALE)


def test_errors_exit_2_without_traceback(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "f").write_text("x")
    assert run(["prepare", "synthetic", "--out", str(out), "--rows", "10", "--tables", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and "Traceback" not in err
    assert run(["stats", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(["prepare", "synthetic", "--out", str(tmp_path / "y"), "--rows", "10", "--tables", "5",
                "--table-scale", "0.1"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(["prepare", "synthetic", "--out", str(tmp_path / "y"), "--rows", "-3"])


def test_prepare_criteo_skip_reports(tmp_path, capsys):
    tsv = str(tmp_path / "tsv")
    assert run(["prepare", "synthetic", "--out", tsv, "--rows", "1000", "--table-scale", "0.0001",
                "--format", "criteo-tsv", "--no-progress"]) == 0
    capsys.readouterr()
    days = sorted(os.path.join(tsv, f) for f in os.listdir(tsv) if f.endswith(".txt"))
    assert [os.path.basename(d) for d in days] == ["day_0.txt", "day_1.txt"]
    with open(days[0], "a") as f:
        f.write("garbage line\n")
    out = str(tmp_path / "pq")
    assert run(["prepare", "criteo", "--input", *days, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "day_0.txt:1001: expected 40 tab-separated fields, got 1" in err
    assert not os.path.exists(out)
    assert run(["prepare", "criteo", "--input", *days, "--out", out, "--on-bad-line", "skip",
                "--max-ind-range", "1000", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "wrote 2 parts (1,100 rows)" in text
    assert "skipped 1 bad lines" in text and "day_0.txt:1001: expected 40" in text
    assert read_meta(out).cardinalities == [1000] * 26


def test_prepare_avazu(tmp_path, capsys):
    header = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
              "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
    line = "1,1,14102100,1005,0,a,b,c,d,e,f,g,h,i,1,2,15706,320,50,1722,0,35,-1,79"
    src = tmp_path / "train.csv"
    src.write_text(header + "\n" + line + "\n" + line + "\n")
    out = str(tmp_path / "av")
    assert run(["prepare", "avazu", "--input", str(src), "--out", out, "--min-count", "2", "--no-progress"]) == 0
    assert "wrote 1 parts (2 rows)" in capsys.readouterr().out
    assert read_meta(out).num_tables == 23
