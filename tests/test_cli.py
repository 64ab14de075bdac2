"""The command line: one line per user error, exit codes, JSON output, inspect."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from sanitize.cli import main

FAST = ["--arch", "small", "--quick", "--device", "cpu", "--batch-size", "64", "--quiet"]


def sanitize_cli(*args, cwd=None):
    """Run ``python -m sanitize`` as a user would; returns (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "sanitize", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return done.returncode, done.stdout, done.stderr


def test_run_json_then_inspect(make_shards, tmp_path, cifar_samples):
    data = make_shards(120, per_shard=60)
    (data / "stray.jpg").write_bytes(cifar_samples[0][1])  # an input warning, which --json must carry too
    code, stdout, stderr = sanitize_cli("run", data, "--out", tmp_path / "out", "--json", *FAST)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["counts"]["total"] == 120 and result["method"] == "advrbd"
    assert set(result["outputs"]) >= {"clean", "relabeled", "scores", "manifest", "model"}
    assert result["input_warnings"] == json.loads((tmp_path / "out" / "manifest.json").read_text())["input"]["warnings"]
    assert "1 image file(s) beside the shards" in result["input_warnings"][0]
    code, stdout, _ = sanitize_cli("inspect", tmp_path / "out")
    assert code == 0 and "120 samples" in stdout and "suspected per class" in stdout


@pytest.mark.parametrize("args, message", [
    (["run", "{missing}", "--out", "{tmp}/o"], "not found"),
    (["run", "{data}", "--out", "{data}/inside"], "inside"),
    (["run", "{data}", "--out", "{tmp}/o", "--device", "cuda:7"], "cuda"),
    (["run", "{data}", "--out", "{tmp}/o", "--set", "epsilon"], "KEY=VALUE"),
    (["run", "{data}", "--out", "{tmp}/o", "--set", "partition_rate=2"], "partition_rate must be > 0 and < 1"),
    (["run", "{data}", "--out", "{tmp}/o", "--arch", "vgg"], "arch must be one of mobilenetv2, resnet18"),
    (["run", "{data}", "--out", "{tmp}/o", "--image-size", "4"], "between 8 and 4096"),
    (["run", "{data}", "--out", "{tmp}/o", "--method", "dbd", "--set", "filter_ratio=1"],
     "filter_ratio must be > 0 and < 1"),
    (["run", "{data}", "--out", "{tmp}/o", "--config", "{tmp}/none.toml"], "config file not found"),
    (["inspect", "{tmp}"], "manifest"),
    (["run", "{data}", "--out", "{tmp}/o", "--set", "device=cpu"], "not a method option but a flag: use --device"),
    (["run", "{data}", "--out", "{tmp}/o", "--set", "image-size=32"], "use --image-size"),
    (["run", "{data}", "--out", "{tmp}/o", "--set", "size=32"], "unknown option(s) for advrbd: size"),
    (["run", "{data}", "--out", "{tmp}/o", "--quick", "--set", "quick=maybe"], "option quick must be true or false"),
    (["poison", "{data}", "--attack", "blend", "--rate", "0.1", "--out", "{tmp}/p", "--set", "seed=3"],
     "--set takes the attack's parameters, not seed: use --seed"),
])
def test_user_errors_are_one_line_and_exit_2(args, message, make_shards, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_shards(20)
    filled = [a.format(missing=tmp_path / "missing", tmp=tmp_path, data=data) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(filled[:1] + (FAST if filled[0] == "run" else []) + filled[1:])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sanitize: error:") and message.lower() in err.lower() and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, config, seed", [
    ([], "", 0), (["--set", "seed=5"], "", 5), ([], "seed = 7", 7), (["--seed", "3"], "seed = 7", 3),
    (["--seed", "3", "--set", "seed=5"], "", 3),
])
def test_the_seed_comes_from_the_flag_else_set_else_the_config(args, config, seed, tmp_path, monkeypatch):
    from sanitize import methods, pipeline

    (tmp_path / "options.toml").write_text(config)
    called = {}

    class Called(Exception):
        pass

    def fake_run(data, method, out, config, **kwargs):
        names = {f.name for f in dataclasses.fields(methods.load(method)[1])}
        options = {k: v for k, v in kwargs.items() if k in names}
        called["options"] = methods.resolve_options(method, config, **options)
        raise Called

    monkeypatch.setattr(pipeline, "run", fake_run)
    with pytest.raises(Called):
        main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "options.toml"),
              *FAST, *args])
    assert called["options"].seed == seed


def test_errors_print_no_traceback(tmp_path):
    code, stdout, stderr = sanitize_cli("run", tmp_path / "nothing-here", "--out", tmp_path / "o", *FAST)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().startswith("sanitize: error:") and len(stderr.strip().splitlines()) == 1


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(make_shards, tmp_path):
    """A file size limit (ulimit -f) stands in for a full disk: the writes fail with EFBIG mid-run."""
    import resource

    data = make_shards(60)

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run([sys.executable, "-m", "sanitize", "run", str(data), "--out", str(tmp_path / "o"), *FAST],
                          capture_output=True, text=True, preexec_fn=limit_files,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    out = (tmp_path / "o").resolve()
    assert done.stderr.strip() == f"sanitize: error: cannot write the output {out}: File too large; the partial " \
                                  f"output was removed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name]


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_killed_run_leaves_nothing_behind(signal_name, code, make_shards, tmp_path):
    import shutil
    import signal
    import time

    data = make_shards(200)
    out = tmp_path / "o"
    for _ in range(5):
        # A suite started in the background (nohup, CI runners) inherits SIGINT ignored, and so would the
        # run, where Python then installs no KeyboardInterrupt: give it the default a terminal gives.
        process = subprocess.Popen([sys.executable, "-m", "sanitize", "run", str(data), "--out", str(out), *FAST],
                                   stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60  # wait for the staging folder: the run has started writing
        while not list(tmp_path.glob(".o.sanitize-tmp-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be stopped"
        process.send_signal(getattr(signal, signal_name))
        _, stderr = process.communicate(timeout=120)
        if not (out / "manifest.json").exists():
            break
        # On a busy machine the signal can land after the outputs moved into place (the run is done,
        # and Python, exiting, dies of it): that run was not stopped mid-way, so stop another.
        shutil.rmtree(out)
    else:
        pytest.fail("every run finished before the signal reached it")
    # A SIGINT that lands in code run through PyRun_String (seen during the ONNX export) sets CPython's
    # "unhandled KeyboardInterrupt" flag even though the run catches it; under `python -m` the
    # interpreter then ends by SIGINT (returncode -2) after the clean exit (3.11, traced with strace:
    # kill(self, SIGINT) after "interrupted"; the `sanitize` script exits 130). A shell reports 130.
    died_of_it = -signal.SIGINT if signal_name == "SIGINT" else code
    assert process.returncode in (code, died_of_it) and "Traceback" not in stderr, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == ("sanitize: error: terminated" if signal_name == "SIGTERM"
                                               else "sanitize: error: interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == [data.name]


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, stderr = sanitize_cli("run", tmp_path / "empty", "--out", tmp_path / "o", *FAST)
    assert code == 2 and "Traceback" not in stderr and "sanitize: error:" in stderr


def test_help_and_version():
    code, stdout, _ = sanitize_cli("--help")
    assert code == 0 and "run" in stdout and "poison" in stdout and "inspect" in stdout
    code, stdout, _ = sanitize_cli("--version")
    assert code == 0 and "sanitize" in stdout


def test_options_lists_every_option_with_defaults_that_resolve_back():
    from sanitize import methods

    code, stdout, _ = sanitize_cli("options", "advrbd", "--json")
    rows = {row["name"]: row for row in json.loads(stdout)}
    assert code == 0 and rows["detect_augment"] == {"name": "detect_augment", "type": "crop|flip|none", "range": "",
                                                    "default": "flip", "quick": "none"}
    assert (rows["enhance_augment"]["default"], rows["enhance_augment"]["quick"]) == ("crop", "none")
    assert rows["partition_rate"]["range"] == "> 0 and < 1"
    assert rows["batch_size"]["type"] == "int" and rows["batch_size"]["quick"] < rows["batch_size"]["default"]
    for method in ("advrbd", "dbd"):
        described = methods.describe(method)
        assert [row["name"] for row in described] == list(dataclasses.asdict(methods.resolve_options(method)))
        for row in described:  # what the listing shows is what --set accepts
            assert getattr(methods.resolve_options(method, **{row["name"]: row["default"]}), row["name"]) \
                == row["default"]
    code, stdout, _ = sanitize_cli("options", "dbd")
    assert code == 0 and stdout.splitlines()[0].split() == ["option", "type", "default", "range", "under", "--quick"]
    assert any(line.split() == ["ss_epochs", "int", "60", ">=", "1", "5"] for line in stdout.splitlines())


def test_poison_takes_a_class_name_and_prints_the_attack_warnings(make_shards, tmp_path, capsys):
    # SIG is clean-label: at 50% it wants more target-class samples than 60 images hold, so the rate is capped.
    data = make_shards(60, per_shard=60)
    main(["poison", str(data), "--attack", "sig", "--rate", "0.5", "--target", "automobile",
          "--out", str(tmp_path / "poisoned")])
    captured = capsys.readouterr()
    truth = json.loads((tmp_path / "poisoned" / "truth.json").read_text())
    assert truth["target"] == 1 and truth["warnings"]
    # the class's name too: with numeric class names an index and a name can be told apart only by it
    assert "target class 1, 'automobile'" in captured.out
    assert f"of {truth['counts']['readable']} readable samples" in captured.out
    assert captured.err.count("warning: ") == len(truth["warnings"])
    main(["poison", str(data), "--attack", "badnets", "--rate", "0.1", "--format", "imagefolder", "--quiet",
          "--out", str(tmp_path / "folder")])
    assert "6 poisons moved into the folder of their new label, 54 other keys changed with the copy's class " \
        "folders" in capsys.readouterr().out  # not "60 renamed to carry their new label"
    main(["poison", str(data), "--attack", "sig", "--rate", "0.05", "--format", "imagefolder", "--quiet",
          "--out", str(tmp_path / "sig")])
    assert "  60 keys changed with the copy's class folders;" in capsys.readouterr().out  # clean-label: none moved


def test_poison_reports_its_stages_and_the_slow_attacks_steps(make_shards, tmp_path, capsys):
    """Label-Consistent trains a surrogate and runs PGD (minutes on a CPU): each is a stage the user sees."""
    data = make_shards(60, per_shard=60)
    fast = ["--set", "surrogate_arch=small", "--set", "epochs=1", "--set", "pgd_steps=2", "--set", "batch_size=64"]
    main(["poison", str(data), "--attack", "label_consistent", "--rate", "0.05", "--out", str(tmp_path / "lc"),
          *fast])
    stages = [line.split("stage ")[1] for line in capsys.readouterr().err.splitlines() if " stage " in line]
    assert stages == ["1/4: read", "2/4: surrogate", "3/4: pgd", "4/4: write"]
    main(["poison", str(data), "--attack", "badnets", "--rate", "0.1", "--out", str(tmp_path / "b")])
    assert [line.split("stage ")[1] for line in capsys.readouterr().err.splitlines() if " stage " in line] == [
        "1/3: read", "2/3: poison", "3/3: write"]
    main(["poison", str(data), "--attack", "badnets", "--rate", "0.1", "--out", str(tmp_path / "q"), "--quiet"])
    assert capsys.readouterr().err == ""


def test_an_onnx_model_that_disagrees_is_exit_3_and_one_line(make_shards, tmp_path, monkeypatch, capsys):
    from sanitize import pipeline
    from sanitize.formats.onnx import OnnxCheckError

    def disagree(*args, **kwargs):
        raise OnnxCheckError("exported ONNX model disagrees with torch")

    monkeypatch.setattr(pipeline, "check_onnx", disagree)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(make_shards(40)), "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and err.strip() == (
        "sanitize: error: exported ONNX model disagrees with torch; no output was written")
    assert not (tmp_path / "out").exists()


def test_a_run_that_flags_most_samples_warns_on_stderr_and_in_the_manifest(make_shards, tmp_path, capsys):
    main(["run", str(make_shards(60)), "--out", str(tmp_path / "out"), *FAST, "--set", "split_margin=-1"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["suspected"] == 60
    warning, = manifest["warnings"]
    assert warning.startswith("60 of 60 samples are suspected") and "trained on no sample" in warning
    assert f"warning: {warning}" in capsys.readouterr().err
    main(["inspect", str(tmp_path / "out")])
    assert f"warning: {warning}" in capsys.readouterr().err
    main(["inspect", str(tmp_path / "out"), "--json"])  # machines are told too
    assert json.loads(capsys.readouterr().out)["warnings"] == [warning]


def test_inspect_refuses_a_negative_suspect_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # a slice would have listed all but the last
        main(["inspect", str(tmp_path), "--suspects", "-1"])
    assert exit_info.value.code == 2 and "-1 is not in the range x>=0" in capsys.readouterr().err


def test_the_summary_prints_the_warnings_a_few_at_a_time(capsys):
    from types import SimpleNamespace

    from sanitize.cli import WARNINGS_SHOWN, _report

    warnings = [f"shard part-{i}.tar may be truncated" for i in range(WARNINGS_SHOWN + 3)]
    verdicts = [f"verdict {i}" for i in range(WARNINGS_SHOWN + 1)]  # a hand-made manifest may hold any number
    result = SimpleNamespace(method="advrbd", counts={"total": 2, "clean": 2, "suspected": 0, "unreadable": 0},
                             suspect_target=None, per_class={"a": {"total": 1, "suspected": 0}},
                             manifest={"input": {"classes": ["a"], "warnings": warnings}, "suspects": [],
                                       "unreadable": []}, timings_s={}, out="o", outputs={}, warnings=verdicts,
                             input_warnings=warnings)
    _report(result, as_json=False)
    out, err = capsys.readouterr()
    assert "skipped" not in out  # nothing was
    err = err.splitlines()
    assert err == [f"warning: {w}" for w in verdicts[:WARNINGS_SHOWN]] + \
        ["warning: 1 more in manifest.json (warnings)"] + [f"warning: {w}" for w in warnings[:WARNINGS_SHOWN]] + \
        ["warning: 3 more in manifest.json (input/warnings)"]


def test_the_summary_names_the_class_the_suspects_point_to_and_how_many_are_relabeled(capsys):
    from types import SimpleNamespace

    from sanitize.cli import _report

    target = {"class": "frog", "label": 1, "share": 0.686, "lift": 6.86, "p_value": 0.0, "relabeled_away": 0.04}
    result = SimpleNamespace(method="advrbd", counts={"total": 10, "clean": 9, "suspected": 1, "unreadable": 0},
                             suspect_target=target, per_class={"frog": {"total": 10, "suspected": 1}},
                             manifest={"input": {"classes": ["cat", "frog"], "warnings": []}, "suspects": [],
                                       "unreadable": []}, timings_s={}, out="o", outputs={}, warnings=[],
                             input_warnings=[])
    _report(result, as_json=False)
    assert ("  suspects point to class 'frog': 69% of suspects carry it, 6.9x its share of the data; the clean "
            "model gives 4% of those another label: hard or memorised 'frog' images, a clean-label backdoor, or a "
            "backdoor the clean model learned from poisons the split missed (then model.onnx carries it too)\n"
            ) in capsys.readouterr().out
    # Most relabeled away: what a dirty-label backdoor's poisons look like to a clean model; nothing to add.
    result.suspect_target = {**target, "relabeled_away": 0.9}
    _report(result, as_json=False)
    assert "the clean model gives 90% of those another label\n" in capsys.readouterr().out


def test_the_summary_counts_the_skipped_files_by_reason(make_imagefolder, tmp_path, capsys):
    root = make_imagefolder(60)
    for index in range(3):
        (root / "cat" / f"notes{index}.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    main(["run", str(root), "--out", str(tmp_path / "out"), *FAST])
    assert "  skipped files: 3 not_image, 1 hidden\n" in capsys.readouterr().out


def test_per_class_line_stays_one_screen_for_many_classes():
    from sanitize.cli import per_class_line

    few = {"cat": {"suspected": 0, "total": 5}, "dog": {"suspected": 2, "total": 5}}
    assert per_class_line(few) == "cat 0/5, dog 2/5"
    many = {f"c{k:03d}": {"suspected": int(k % 7 == 0), "total": 3} for k in range(1000)}
    many["c500"] = {"suspected": 3, "total": 3}
    line = per_class_line(many)
    named = line.split(", ")[:-1]
    assert named[0] == "c500 3/3" and len(named) == 10 and all(part.endswith("1/3") for part in named[1:])
    # Every suspect and sample is accounted for: the shown classes plus the total of the rest.
    flagged = sum(row["suspected"] for row in many.values())
    assert line.endswith(f"{flagged - 3 - 9}/{3000 - 30} in the 990 other classes")
    assert per_class_line({f"c{k}": {"suspected": 0, "total": 1} for k in range(50)}) == "none in all 50 classes"


def test_stage_progress_prints_steps_within_a_stage_sparingly(capsys, monkeypatch):
    from sanitize.cli import StageProgress

    progress = StageProgress(["ingest", "warmup"])
    assert not progress.tty  # pytest captures stderr: the plain-line form
    progress.stage("ingest")
    progress.stage("warmup")
    for done in range(1, 11):
        progress.advance(done, 10)  # within LINE_S of the stage's start: no line
    monkeypatch.setattr(StageProgress, "LINE_S", 0.0)
    progress.advance(3, 10)
    progress.advance(10, 10)  # the stage's end is not a line of its own: the next stage says it
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["stage 1/2: ingest", "stage 2/2: warmup",
                                                        "  warmup 3/10, ~0s left"]


def test_names_from_the_data_cannot_rewrite_the_summary_on_the_terminal(capsys):
    """A class name with a newline broke the summary's line; one with U+202E (right-to-left override)
    reversed what the rest of it showed (the audit). Both print as escapes; other text stays as it is."""
    from types import SimpleNamespace

    from sanitize import cli

    classes = ["cat\nwarning: all clean", "dog\u202e", "café 猫"]
    per_class = {name: {"suspected": 1, "total": 5} for name in classes}
    manifest = {"input": {"classes": classes, "skipped": {}}, "unreadable": [],
                "suspects": [{"score": 0.9, "key": "k\x1b[2J", "label": 0, "relabel": 1}]}
    result = SimpleNamespace(method="advrbd", counts={"total": 15, "clean": 12, "suspected": 3, "unreadable": 0},
                             suspect_target=None, per_class=per_class, manifest=manifest, timings_s={},
                             warnings=[f"class {classes[0]} is left out"], input_warnings=[], out="out", outputs={})
    cli._report(result, as_json=False)
    out, err = capsys.readouterr()
    assert "cat\\nwarning: all clean 1/5, dog\\u202e 1/5, café 猫 1/5" in out
    assert "k\\x1b[2J  cat\\nwarning: all clean -> dog\\u202e" in out
    assert err == "warning: class cat\\nwarning: all clean is left out\n"
    assert "\u202e" not in out and "\x1b" not in out


def test_dbds_summary_says_its_suspects_are_a_share_by_design(make_shards, tmp_path, capsys):
    """DBD flags about half of any dataset: the summary must not read as "half your data is poisoned"."""
    main(["run", str(make_shards(40)), "--out", str(tmp_path / "dbd"), *FAST, "--method", "dbd"])
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "dbd" / "manifest.json").read_text())
    changed = sum(suspect["relabel"] != suspect["label"] for suspect in manifest["suspects"])
    assert "  dbd keeps 50% of each class as clean and suspects the rest by design: a suspect is not trusted, " \
           f"not necessarily poisoned. clean/ holds the rest with their given labels; relabeled/ gives every " \
           f"suspect the clean model's label ({changed} of {manifest['counts']['suspected']} changed)" in out
    main(["inspect", str(tmp_path / "dbd")])
    assert "suspects the rest by design" in capsys.readouterr().out
    main(["run", str(make_shards(40)), "--out", str(tmp_path / "advrbd"), *FAST])
    assert "by design" not in capsys.readouterr().out
