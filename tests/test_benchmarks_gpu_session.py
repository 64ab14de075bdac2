"""benchmarks/gpu_session.sh: each part its header lists runs what it says, with python3 replaced by a
recorder (the device time is too scarce to find a broken part there)."""
import json
import os
import re
import subprocess

import pytest

from conftest import BENCHMARKS
from sanitize.attacks.registry import REGISTRY

SCRIPT = BENCHMARKS / "gpu_session.sh"
LISTED = {int(part) for part in re.findall(r"gpu_session\.sh (\d+)", SCRIPT.read_text())}  # the header's order
HANDLED = sorted({int(part) for part in re.findall(r'"\$PART" = (\d+)', SCRIPT.read_text())})
RUN_BEFORE = {"badnets", "blend", "sig", "wanet"}  # at 5% with AdvrBD and no defense (results.json)


def run_part(tmp_path, part: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the part with a python3 that writes its arguments to a file; returns the result and those lines."""
    bin_dir, out, calls = tmp_path / "bin", tmp_path / "out", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "CALLS": str(calls),
           "COMMIT": "abc1234"}
    result = subprocess.run(["bash", str(SCRIPT), part], cwd=BENCHMARKS.parent, env=env, capture_output=True,
                            text=True, timeout=60)
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_the_script_runs_parts_1_to_14_and_its_header_lists_all_not_yet_run():
    assert HANDLED == list(range(1, 15)) and LISTED == set(range(2, 15)) - {7, 12}  # 1, 7 and 12 have run


def test_part_14_runs_advrbd_on_badnets_at_20_percent_two_ways_then_sig(tmp_path):
    _, calls = run_part(tmp_path, "14")
    cells = []
    for call in (call.split() for call in calls if call.startswith("benchmarks/bench.py")):
        assert call[call.index("--methods") + 1] == "advrbd"
        rates = call[call.index("--rates") + 1] if "--rates" in call else "0.05"
        cells.append((call[call.index("--attacks") + 1], rates, call[call.index("--set") + 1]))
    assert cells == [("badnets", "0.2", "unlearn_pool=0.5"), ("badnets", "0.2", "unlearn_skips_suspects=true"),
                     ("sig", "0.05", "unlearn_pool=0.5")]


def test_part_13_replays_the_detections_it_keeps(tmp_path):
    """The kept detection of SIG and of the clean set, each replayed from the file bench.py names it."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("sig-0.05-advrbd-0123456789.csv.gz", "train-advrbd-0123456789.csv.gz"):
        (out / name).write_bytes(b"")
    _, calls = run_part(tmp_path, "13")
    [bench] = [call.split() for call in calls if call.startswith("benchmarks/bench.py")]
    assert bench[bench.index("--attacks") + 1] == "sig,none" and str(out) in bench[bench.index("--keep-scores") + 1]
    replays = [call.split() for call in calls if call.startswith("benchmarks/replay_clean.py")]
    assert [call[call.index("--scores") + 1] for call in replays] == [
        str(out / "sig-0.05-advrbd-0123456789.csv.gz"), str(out / "train-advrbd-0123456789.csv.gz")]
    assert [call[call.index("--poisoned") + 1] for call in replays] == ["/tmp/bench/data/cifar10/sig-0.05",
                                                                          ".data/train"]
    variants = [line.split(" --variants ", 1)[1] for line in calls if line.startswith("benchmarks/replay_clean.py")]
    shares = [[variant.get("finetune_unlearn") for variant in json.loads(text)] for text in variants]
    assert shares == [[None, 0.02, 0.03], [None, 0.01, 0.03]]


@pytest.mark.parametrize("part", [str(part) for part in HANDLED])
def test_each_part_runs_a_benchmark_script_into_out(tmp_path, part):
    result, calls = run_part(tmp_path, part)
    assert result.returncode == 0, result.stderr
    scripts = [call.split()[0] for call in calls if call.startswith("benchmarks/")]
    assert scripts and all((BENCHMARKS.parent / script).is_file() for script in scripts)


def matrix_cells(tmp_path, part: int) -> set[tuple[str, str]]:
    """The (attack, rate) cells the part's bench.py calls run, each with AdvrBD and no defense."""
    tmp_path = tmp_path / str(part)
    tmp_path.mkdir()
    _, calls = run_part(tmp_path, str(part))
    cells = set()
    for call in (call.split() for call in calls if call.startswith("benchmarks/bench.py")):
        assert call[call.index("--methods") + 1] == "none,advrbd" and call[call.index("--commit") + 1] == "abc1234"
        assert call[call.index("--results") + 1] == str(tmp_path / "out" / "results.json")
        rates = call[call.index("--rates") + 1].split(",") if "--rates" in call else ["0.05"]
        cells |= {(attack, rate) for attack in call[call.index("--attacks") + 1].split(",") for rate in rates}
    return cells


def test_the_matrix_parts_run_every_attack_and_badnets_and_blend_at_the_other_rates(tmp_path):
    new = matrix_cells(tmp_path, 9) | matrix_cells(tmp_path, 10)
    assert {name for attack, _ in new for name in attack.split("+")} | RUN_BEFORE == set(REGISTRY)
    assert ("badnets+blend", "0.05") in new  # two triggers at once
    assert ("label_consistent", "0.025") in new  # the DBD paper's rate
    assert all(rate == "0.05" for attack, rate in new if attack != "label_consistent")
    other_rates = matrix_cells(tmp_path, 11) | matrix_cells(tmp_path, 12)
    assert other_rates == {(attack, rate) for attack in ("badnets", "blend") for rate in ("0.01", "0.1", "0.2")}


def test_an_unknown_part_is_refused(tmp_path):
    result, calls = run_part(tmp_path, "15")
    assert result.returncode == 2 and "1 to 14" in result.stderr
