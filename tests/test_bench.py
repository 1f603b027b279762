"""``dinodet bench``: records, table and JSON (speed itself is measured in benchmarks/, not tested)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from dinodet.cli import main
from dinodet.deploy.bench import parse_size, run_bench
from dinodet.errors import ConfigError


def test_bench_cli_writes_records_for_both_tasks(tmp_path, capsys, one_thread):
    out = tmp_path / "bench" / "records.json"
    rc = main(["bench", "--preset", "tiny", "--size", "64x80", "--task", "both", "--modes", "exact,channels_last",
               "--iters", "1", "--warmup", "0", "--json", str(out), "--plot", str(tmp_path / "bench.png")])
    assert rc == 0
    with Image.open(tmp_path / "bench.png") as chart:
        assert chart.size == (800, 580)  # two tasks, one panel each
    records = json.loads(out.read_text())
    assert [(r["task"], r["mode"]) for r in records] == [
        ("infer", "reference"), ("infer", "exact"), ("infer", "channels_last"),
        ("train", "reference"), ("train", "exact")]
    for r in records:
        assert {"mode", "task", "ms", "img_per_s", "peak_mem_gb", "speedup"} <= set(r)
        assert r["ms"] > 0 and r["img_per_s"] > 0 and r["peak_mem_gb"] is None  # no allocator stats on CPU
        # what ran: the reference is always grid_sample; on CPU the other inference modes get
        # embedding_bag, training keeps grid_sample (its backward is the faster one there)
        fast_infer = r["task"] == "infer" and r["mode"] != "reference"
        assert r["msda"] == ("embedding_bag" if fast_infer else "pytorch")
    assert records[0]["speedup"] == 1.0 and records[3]["speedup"] == 1.0
    assert records[1]["speedup"] == pytest.approx(records[0]["ms"] / records[1]["ms"], rel=0.01)
    table = capsys.readouterr().out
    assert "channels_last" in table and "speed-up" in table


def test_a_failing_fast_mode_is_reported_and_skipped(monkeypatch, caplog, one_thread):
    from dinodet.deploy import bench

    real = bench._infer_one

    def flaky(model, name, *args):
        if name == "exact":
            raise RuntimeError("triton: no kernel for this GPU\nlong traceback ...")
        return real(model, name, *args)

    monkeypatch.setattr(bench, "_infer_one", flaky)
    records = run_bench("tiny", "cpu", (48, 48), task="infer", modes=["exact", "channels_last"], warmup=0, iters=1)
    assert [r.mode for r in records] == ["reference", "channels_last"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "infer mode 'exact' failed and is left out: RuntimeError: triton: no kernel for this GPU"]
    monkeypatch.setattr(bench, "_infer_one", lambda *a: (_ for _ in ()).throw(RuntimeError("baseline broke")))
    with pytest.raises(RuntimeError, match="baseline broke"):  # without a baseline there is no table
        run_bench("tiny", "cpu", (48, 48), task="infer", modes=["exact"], warmup=0, iters=1)


def test_training_batch_is_at_least_two(one_thread):
    (record,) = run_bench("tiny", "cpu", (48, 48), batch=1, task="train", modes=["reference"], warmup=0, iters=1)
    assert record.img_per_s == pytest.approx(2 * 1000 / record.ms, rel=0.01)


@pytest.mark.parametrize("argv, message", [
    (["--size", "800"], "size must look like 800x1199"),
    (["--size", "100000x100000"], "size must be at most 8192x8192"),  # refused before allocating anything
    (["--modes", "warp"], "unknown mode(s) warp"),
    (["--preset", "dino_r9000"], "unknown preset"),
    (["--modes", "fp16", "--device", "cpu"], "mode 'fp16' cannot be benchmarked for infer on cpu"),
    (["--modes", "channels_last", "--task", "train"], "mode 'channels_last' cannot be benchmarked for train"),
    (["--json", "{tmp}"], "is a folder; give a file name"),  # found before the benchmark runs
])
def test_bad_bench_arguments_are_one_line_errors(argv, message, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_parse_size():
    assert parse_size("800x1199") == (800, 1199)
    with pytest.raises(ValueError):
        parse_size("16x16")


def test_speed_chart_one_panel_per_task_with_marks(tmp_path):
    from dinodet.engine.plots import plot_speed

    records = [{"task": "infer", "mode": "reference", "ms": 42.1, "speedup": 1.0},
               {"task": "infer", "mode": "compile_bf16", "ms": 6.6, "speedup": 6.38}]
    path = plot_speed(records, tmp_path / "charts" / "speed.png", "H100", {"infer": {"official fp32": 58.8}})
    with Image.open(path) as chart:
        assert chart.size == (800, 320)
        # bars are drawn: the reference grey and the fast mode blue both appear
        colors = {c for _, c in chart.convert("RGB").getcolors(1 << 20)}
    assert (153, 153, 153) in colors and (31, 119, 180) in colors
    assert not list(path.parent.glob(".*tmp*"))  # written atomically, no temporary left
    with pytest.raises(ValueError, match="no benchmark records"):
        plot_speed([], tmp_path / "empty.png")


def test_exported_backend_rows_in_the_same_run(one_thread, monkeypatch, capsys):
    """`dinodet bench --modes exact,openvino` exports the benched model inside the run and times it beside
    the torch modes: one table, one reference, setup (export) and first-image times, the threads that ran."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("openvino")
    monkeypatch.setenv("DINODET_OPENVINO_CACHE", "")
    assert main(["bench", "--preset", "tiny", "--size", "96x128", "--modes", "exact,openvino", "--iters", "1",
                 "--warmup", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("infer ")}
    assert list(rows) == ["reference", "exact", "openvino"]
    assert rows["reference"][-3] == "1.00x" and rows["openvino"][2] == "embedding_bag"  # a fixed-shape IR
    assert float(rows["openvino"][-1]) > 0 and float(rows["openvino"][-2]) > 0  # setup s (export), first s
    assert rows["exact"][-1] == "-"  # nothing exported for a torch mode
    assert "openvino: openvino threads=1 hint=LATENCY streams=1 cache=off" in out
    assert "exact: torch intra_op=1" in out


def test_exported_backends_are_cpu_modes():
    from dinodet.deploy.bench import EXPORTED, bench_modes

    assert bench_modes("openvino_int8,onnxruntime", "infer", "cpu") == ["openvino_int8", "onnxruntime"]
    with pytest.raises(ConfigError, match="cannot be benchmarked for train"):
        bench_modes("openvino", "train", "cpu")
    assert set(EXPORTED) == {"onnxruntime", "openvino", "openvino_int8"}
