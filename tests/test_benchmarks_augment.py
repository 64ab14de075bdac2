"""benchmarks/bench_augment.py: both ways of the colour jitter timed, on the device asked for."""
import json

from conftest import load_benchmark


def test_each_size_times_both_ways(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_augment.py", "--device", "cpu", "--sizes", "8x4,16x2", "--repeat", "2"])
    load_benchmark("bench_augment").main()
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and list(report["ms"]) == ["8x4", "16x2"]
    assert all(set(ways) == {"picked", "sync_free"} and min(ways.values()) > 0 for ways in report["ms"].values())
