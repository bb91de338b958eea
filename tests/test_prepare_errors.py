"""`bagpipe prepare` and the default dataset: bad input and I/O failures are one clear
line, exit code 2, and nothing half-written is left behind."""

import os
import signal
import subprocess
import sys
import threading
import time

from test_datasets_cli import run


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.startswith(".")]


def test_a_directory_or_an_empty_file_as_input(tmp_path, capsys):
    assert run(["prepare", "criteo", "--input", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is a directory; give the input files" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert run(["prepare", "criteo", "--input", str(empty), "--out", str(tmp_path / "out"),
                "--max-ind-range", "100"]) == 2
    assert "empty.txt: no data rows" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out") and not _leftovers(tmp_path)


def test_an_io_error_is_exit_2_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from bagpipe.datasets import writer

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device", self.path)

    monkeypatch.setattr(writer.ParquetPartWriter, "write", disk_full)
    assert run(["prepare", "synthetic", "--out", str(tmp_path / "syn"), "--rows", "500", "--table-scale",
                "0.001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "No space left on device; nothing was written" in err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "syn") and not _leftovers(tmp_path)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bagpipe.cli", "prepare", "synthetic", "--out",
                             str(tmp_path / "big"), "--rows", "20000000", "--table-scale", "0.01"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _leftovers(tmp_path):  # the temporary directory exists: it is writing
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; nothing was written" in err
    assert not os.path.exists(tmp_path / "big") and not _leftovers(tmp_path)


def test_two_jobs_racing_for_the_default_dataset_generate_it_once(tmp_path, monkeypatch):
    from bagpipe import train
    from bagpipe.datasets import synthetic

    made = []

    def slow_generate(out, **kwargs):
        made.append(out)
        time.sleep(0.3)
        os.makedirs(out)

    monkeypatch.setattr(synthetic, "generate_synthetic", slow_generate)
    target = str(tmp_path / "data" / "default")
    threads = [threading.Thread(target=train.ensure_default_data, args=(target,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert made == [target] and os.path.isdir(target)
