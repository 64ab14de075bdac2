"""End to end through sanitize.run on both input formats (CPU, --arch small --quick)."""
import dataclasses
import json
import typing

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
import webdataset

import sanitize
from conftest import write_shard, write_shards
from sanitize import methods, pipeline
from sanitize.formats import read_manifest, read_scores
from sanitize.formats.onnx import OnnxCheckError
from sanitize.formats.records import InputError

FAST = {"arch": "small", "quick": True, "device": "cpu", "batch_size": 64}
FAST_OPTIONS = {key: value for key, value in FAST.items() if key != "device"}


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory, cifar_samples, cifar_classes):
    """One AdvrBD run over 200 real CIFAR samples written as shards."""
    root = tmp_path_factory.mktemp("run")
    data = write_shards(root / "data", cifar_samples[:200], cifar_classes)
    result = sanitize.run(data, method="advrbd", out=root / "out", **FAST)
    return data, root / "out", result


def test_every_output_of_the_contract_is_written(shard_run):
    _, out, result = shard_run
    assert {p.name for p in out.iterdir()} == {"manifest.json", "scores.csv", "clean", "relabeled", "model.onnx"}
    counts = result.counts
    assert counts["total"] == 200 and counts["clean"] + counts["suspected"] + counts["unreadable"] == 200
    assert result.model is not None and result.outputs["model"] == "model.onnx"


def test_clean_shards_hold_exactly_the_samples_judged_clean(shard_run):
    _, out, _ = shard_run
    scores = read_scores(out)
    clean_keys = {row["key"] for row in scores if not row["suspected"]}
    shards = sorted(str(p) for p in (out / "clean").glob("*.tar"))
    read_back = [sample["__key__"] for sample in webdataset.WebDataset(shards, shardshuffle=False)]
    assert sorted(read_back) == sorted(clean_keys)
    relabeled = sorted(str(p) for p in (out / "relabeled").glob("*.tar"))
    everything = list(webdataset.WebDataset(relabeled, shardshuffle=False))
    assert len(everything) == len(scores)
    by_key = {row["key"]: row for row in scores}
    for sample in everything:  # only suspects take the clean model's label; the rest keep theirs
        row = by_key[sample["__key__"]]
        assert int(sample["cls"]) == (row["relabel"] if row["suspected"] else row["label"])
        assert json.loads(sample["json"])["relabel"] == row["relabel"]
    assert any(row["relabel"] != row["label"] for row in scores if not row["suspected"]), "the rule went untested"


def test_manifest_agrees_with_scores_and_the_method(shard_run):
    data, out, result = shard_run
    manifest = read_manifest(out)
    scores = read_scores(out)
    suspects = [row for row in scores if row["suspected"]]
    assert [s["key"] for s in manifest["suspects"]] == [r["key"] for r in sorted(suspects, key=lambda r: -r["score"])]
    assert manifest["method"] == "advrbd" and manifest["options"]["arch"] == "small"
    assert manifest["options"]["quick"] is True and manifest["seed"] == 0
    timings = dict(manifest["timings_s"])
    assert list(timings)[:2] == ["ingest", "warmup"] and list(timings)[-3:] == ["write", "export", "total"]
    # The total is wall time: the stages run one after another, but writing and export overlap.
    total, write, export = timings.pop("total"), timings.pop("write"), timings.pop("export")
    assert sum(timings.values()) + max(write, export) <= total + 0.01
    assert manifest["model"] == {"file": "model.onnx", "arch": "small", "input_size": [32, 32]}
    assert manifest["metrics"]["onnx_check"]["argmax_agree"] is True
    assert result.per_class == manifest["per_class"]
    assert manifest["environment"]["cpu_threads"] == torch.get_num_threads()  # a CPU run depends on it


def test_the_exported_model_reproduces_the_relabels(shard_run, cifar_samples):
    from conftest import decode_jpegs

    _, out, _ = shard_run
    images, _ = decode_jpegs(cifar_samples[:200])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": images.transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
    relabel = np.array([row["relabel"] for row in read_scores(out)])
    assert (logits.argmax(1) == relabel).mean() > 0.98


def test_same_seed_same_manifest(shard_run, tmp_path):
    data, out, _ = shard_run
    sanitize.run(data, method="advrbd", out=tmp_path / "again", **FAST)
    first, second = read_manifest(out), read_manifest(tmp_path / "again")
    for volatile in ("created", "timings_s", "input"):
        first.pop(volatile), second.pop(volatile)
    assert first == second
    for name in ("clean/clean-000000.tar", "scores.csv"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_imagefolder_input_with_imagefolder_relabeled_output(make_imagefolder, tmp_path):
    data = make_imagefolder(200)
    result = sanitize.run(data, out=tmp_path / "out", relabeled_format="imagefolder", **FAST)
    relabeled = torchvision.datasets.ImageFolder(str(tmp_path / "out" / "relabeled"))
    assert len(relabeled) == result.counts["total"] - result.counts["unreadable"] == 200
    assert read_manifest(tmp_path / "out")["input"]["format"] == "imagefolder"


class RecordingProgress(pipeline.Progress):
    def __init__(self):
        self.stages, self.steps = [], {}

    def stage(self, name):
        self.stages.append(name)

    def advance(self, done, total):
        self.steps.setdefault(self.stages[-1], []).append((done, total))


# The stages whose steps (or rounds, or epochs) a run reports as it goes.
ADVANCING = {"advrbd": {"warmup", "score", "enhance", "clean_train", "relearn"}, "dbd": {"simclr", "mixmatch"}}


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_every_registered_method_honours_the_output_contract(method, make_shards, tmp_path):
    data = make_shards(120, per_shard=60)
    progress = RecordingProgress()
    result = sanitize.run(data, method=method, out=tmp_path / "out", progress=progress, **FAST)
    assert progress.stages == pipeline.stages(method)  # each stage once, in order (write and export too)
    assert set(progress.steps) >= ADVANCING[method]
    for steps in progress.steps.values():  # counting up to a fixed total, which is reached
        assert [done for done, _ in steps] == sorted(done for done, _ in steps) and len({t for _, t in steps}) == 1
        assert 0 < steps[-1][0] == steps[-1][1]
    scores = read_scores(tmp_path / "out")
    assert len(scores) == 120 and result.counts["suspected"] == sum(r["suspected"] for r in scores)
    assert all(np.isfinite(r["score"]) for r in scores)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["method"] == method
    # The manifest records the values the method ran with: --quick scaled, --batch-size honoured.
    assert manifest["options"]["quick"] is True and manifest["options"]["batch_size"] == 64
    assert manifest["options"] == dataclasses.asdict(methods.resolve_options(method, **FAST_OPTIONS))


def test_a_failed_onnx_check_writes_nothing(make_shards, tmp_path, monkeypatch):
    def disagree(*args, **kwargs):
        raise OnnxCheckError("exported ONNX model disagrees with torch")

    monkeypatch.setattr(pipeline, "check_onnx", disagree)
    with pytest.raises(OnnxCheckError):
        sanitize.run(make_shards(60), out=tmp_path / "out", **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no OUT, no temporary leftovers


@pytest.mark.parametrize("options, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"epsilon": "big"}, "option epsilon must be a finite number"),
    ({"not_an_option": 1}, "unknown option"),
    ({"warmup_epochs": 1.5}, "whole number"),
    ({"warmup_epochs": float("inf")}, "warmup_epochs must be a whole number"),  # int(inf) overflowed
    ({"lr": float("inf")}, "lr must be a finite number"),  # passed "> 0", then the run diverged
    ({"epsilon": float("nan")}, "epsilon must be a finite number"),
    ({"lr": 1e39}, "lr must be a finite number within float32's range"),  # overflowed in the optimizer
    ({"seed": 2**64}, "seed must be a whole number of at most 2..53"),  # overflowed in torch
    ({"batch_size": 1e30}, "batch_size must be a whole number of at most 2..53"),
    ({"batch_size": 9223372036854775807}, "at most 2..53 in size"),  # was "must be a whole number": it is
    ({"shard_size": 0}, "--shard-size"),
    ({"workers": 0}, "--workers"),
    ({"out": None}, "output directory is required"),
])
def test_bad_options_are_user_errors(options, message, make_shards, tmp_path):
    arguments = {"out": tmp_path / "out", **FAST, **options}
    with pytest.raises(InputError, match=message):
        sanitize.run(make_shards(20), **arguments)


@pytest.mark.parametrize("method, options", [
    ("advrbd", {"lr": 1e12}),
    ("dbd", {"temperature": 1e-30, "ss_epochs": 1, "mixmatch_epochs": 1}),
])
def test_a_diverged_training_is_one_line_not_a_traceback(method, options, make_shards, tmp_path):
    """Values inside every option's range can still blow training up; the run stops at the first epoch
    that does, with one line, and leaves nothing behind."""
    with pytest.raises(InputError, match="training diverged: the loss became NaN or infinite"):
        sanitize.run(make_shards(60), method=method, out=tmp_path / "out", **FAST, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_running_out_of_cpu_memory_is_one_line_not_a_traceback(make_shards, tmp_path):
    """A projection head of 2**40 outputs asks torch's CPU allocator for petabytes."""
    with pytest.raises(InputError, match="out of memory on the CPU; try a smaller --batch-size"):
        sanitize.run(make_shards(20), method="dbd", out=tmp_path / "out", **FAST, projection_dim=2**40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def tiny_png_shards(root, cifar_samples, cifar_classes, count: int, size: tuple[int, int]):
    """``count`` CIFAR images shrunk to ``size`` (H, W), as PNG in shards."""
    import io

    from PIL import Image

    samples = []
    for key, jpg, label in cifar_samples[:count]:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(jpg)).resize(size[::-1]).save(buffer, format="PNG")
        samples.append((key, buffer.getvalue(), label))
    root.mkdir(parents=True)
    for start in range(0, count, 100):
        members = []
        for key, png, label in samples[start:start + 100]:
            members += [(f"{key}.png", png), (f"{key}.cls", str(label).encode())]
        write_shard(root / f"part-{start // 100:06d}.tar", members)
    (root / "classes.json").write_text(json.dumps({"classes": cifar_classes}))
    return root


@pytest.mark.parametrize("method, count, size, options", [
    ("advrbd", 129, (8, 8), {"batch_size": 128}),  # a batch of one 1x1 feature map crashed BatchNorm
    ("dbd", 129, (8, 8), {"batch_size": 128}),
    ("advrbd", 60, (8, 64), {}),  # the crop padded 8 rows by 8
    ("dbd", 60, (8, 64), {}),
    ("advrbd", 20, (32, 32), {"partition_rate": 0.99}),  # the partition took all 20: nothing left to relearn
])
def test_odd_but_valid_sets_run_to_the_end(method, count, size, options, tmp_path, cifar_samples, cifar_classes):
    data = tiny_png_shards(tmp_path / "data", cifar_samples, cifar_classes, count, size)
    result = sanitize.run(data, method=method, out=tmp_path / "out", **{**FAST, **options})
    assert result.counts["total"] == count and result.counts["clean"] + result.counts["suspected"] == count
    assert result.manifest["input"]["image_size"] == list(size)


def test_set_values_are_json_when_they_parse_and_strings_otherwise():
    """One rule for --set in the CLI, bench.py and calibrate_advrbd.py."""
    assert methods.parse_assignments(["split_margin=0.6", "detect_augment=flip", "quick=true", "name=\"x=y\"",
                                      "rounds=[1, 2]", " warmup-epochs = 7 ", "unlearn_skips_suspects=False",
                                      "epsilon=8/255"]) \
        == {"split_margin": 0.6, "detect_augment": "flip", "quick": True, "name": "x=y", "rounds": [1, 2],
            "warmup_epochs": 7, "unlearn_skips_suspects": False, "epsilon": "8/255"}
    for bad in ("epsilon", "=3"):
        with pytest.raises(InputError, match="--set expects KEY=VALUE"):
            methods.parse_assignments([bad])
    # a string never passes for a number
    with pytest.raises(InputError, match="option epsilon must be a finite number"):
        methods.resolve_options("advrbd", **methods.parse_assignments(["epsilon=8/255"]))
    # more digits than Python converts, deeper than its stack: tracebacks before, one line now, cut short
    huge, deep = "1" + "0" * 5000, "[" * 50000
    for text, message in ((f"epsilon={huge}", r"epsilon must be a finite number within float32's range, got "
                                              r"'10{58}\.\.\. \(5003 characters\)$"),
                          (f"pgd_steps={huge}", "pgd_steps must be a whole number, got '1000"),
                          (f"epsilon={deep}", r"epsilon must be a finite number, got '\[\[\[.*\(50002 characters\)$")):
        with pytest.raises(InputError, match=message):
            methods.resolve_options("advrbd", **methods.parse_assignments([text]))


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_every_numeric_option_has_bounds_that_the_defaults_meet_and_a_run_enforces(method):
    _, options_class = methods.load(method)
    hints = typing.get_type_hints(options_class)
    kinds = {f.name: methods._value_type(hints[f.name]) for f in dataclasses.fields(options_class)}
    assert set(options_class.BOUNDS) == {name for name, kind in kinds.items() if kind in (int, float)}
    for quick in (False, True):
        options = methods.resolve_options(method, quick=quick)
        for key, bounds in options_class.BOUNDS.items():
            methods.check_bounds(key, getattr(options, key), bounds)
    step = {">": 0, ">=": -1, "<": 0, "<=": 1}  # from the limit to a value just outside it
    for key, bounds in options_class.BOUNDS.items():
        for bound in bounds:
            comparison, _, limit = bound.partition(" ")
            outside = kinds[key](float(limit) + step[comparison])
            with pytest.raises(InputError, match=f"option {key} must be {' and '.join(bounds)}, got"):
                methods.resolve_options(method, **{key: outside})
    with pytest.raises(InputError, match="option batch_size must be int, got True"):
        methods.resolve_options(method, batch_size=True)


@pytest.mark.parametrize("argument, value, message", [
    ("shard_size", "5x", "--shard-size must be a whole number"), ("shard_size", 0, "at least 1"),
    ("workers", "two", "--workers must be a whole number"), ("workers", 1.5, "whole number")])
def test_run_arguments_of_the_wrong_type_are_a_user_error(argument, value, message, tmp_path):
    with pytest.raises(InputError, match=message):
        sanitize.run(tmp_path, out=tmp_path / "out", **{argument: value})


def test_a_run_from_a_notebook_takes_its_numbers_and_leaves_its_torch_state(make_shards, tmp_path, monkeypatch):
    """numpy's and torch's numbers are numbers; the caller's seed and cuDNN flags are as they were."""
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    torch.manual_seed(123)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(123))
    result = sanitize.run(make_shards(40), out=tmp_path / "out", **{**FAST, "batch_size": np.int64(32)},
                          seed=np.int64(3), image_size=np.int64(32), shard_size=np.int32(16), workers=torch.tensor(1))
    assert torch.initial_seed() == 123 and torch.equal(torch.rand(3), expected)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert result.manifest["options"]["batch_size"] == 32 and result.manifest["options"]["seed"] == 3
    assert result.manifest["input"]["image_size"] == [32, 32]
    assert methods.resolve_options("advrbd", quick=np.bool_(True), epsilon=np.float32(0.5)).epsilon == 0.5
    for bad in (np.float64(2.5), np.bool_(True), torch.tensor(True)):
        with pytest.raises(InputError, match="option warmup_epochs must be"):
            methods.resolve_options("advrbd", warmup_epochs=bad)


def test_the_python_api_names_its_errors_and_its_arguments(make_shards, tmp_path):
    import inspect
    import subprocess
    import sys

    assert sanitize.InputError is InputError and sanitize.OnnxCheckError is OnnxCheckError
    assert "classes_file" in inspect.signature(sanitize.run).parameters  # the whole signature, for help()
    light = "import sys, sanitize; assert 'torch' not in sys.modules and sanitize.InputError"
    assert subprocess.run([sys.executable, "-c", light]).returncode == 0
    with pytest.raises(InputError, match=r"unknown option\(s\) for advrbd: classes; .*run's own arguments: .*"
                                         r"classes_file.*\(--classes is classes_file\)"):
        sanitize.run(tmp_path, out=tmp_path / "out", classes="names.json")
    with pytest.raises(InputError, match="format=..., not fmt="):  # a TypeError from two fmt= before
        sanitize.poison(make_shards(20), attack="badnets", rate=0.1, out=tmp_path / "p", fmt="imagefolder")


def test_options_that_contradict_each_other_are_refused():
    for pool, rate in ((0.05, 0.05), (0.3, 0.4)):
        with pytest.raises(InputError, match="unlearn_pool .* must exceed partition_rate"):
            methods.resolve_options("advrbd", unlearn_pool=pool, partition_rate=rate)
    assert methods.resolve_options("advrbd", unlearn_pool=0.1).unlearn_pool == 0.1
    # SCE with no term at all: every head loss 0, every score 0, an arbitrary split (the audit)
    with pytest.raises(InputError, match="sce_alpha and sce_beta cannot both be 0"):
        methods.resolve_options("dbd", sce_alpha=0, sce_beta=0)
    assert methods.resolve_options("dbd", sce_alpha=0).sce_beta == 1  # either alone is a loss


def test_config_file_tables_are_the_methods_and_the_top_level_applies_to_all(tmp_path):
    config = tmp_path / "options.toml"
    config.write_text("seed = 7\n[advrbd]\nepsilon = 0.05\n[dbd]\nss_epochs = 3\n")
    advrbd = methods.resolve_options("advrbd", config)
    assert (advrbd.seed, advrbd.epsilon) == (7, 0.05)
    assert (methods.resolve_options("dbd", config).seed, methods.resolve_options("dbd", config).ss_epochs) == (7, 3)
    config.write_text("seed = 7\n[advrbd]\nseed = 9\n")  # the method's table wins over the top level
    assert methods.resolve_options("advrbd", config).seed == 9
    config.write_text("[advbrd]\nepsilon = 0.5\n")  # misspelt: never silently ignored
    with pytest.raises(InputError, match=r"unknown table\(s\) \[advbrd\]"):
        methods.resolve_options("advrbd", config)
    config.write_text("[dbd]\nss_lr = nan\n")  # the other method's table is checked too
    with pytest.raises(InputError, match=r"table \[dbd\]: option ss_lr must be a finite number"):
        methods.resolve_options("advrbd", config)
    config.write_text("[dbd]\nepsilon = 0.1\n")
    with pytest.raises(InputError, match=r"table \[dbd\]: unknown option\(s\) for dbd: epsilon"):
        methods.resolve_options("advrbd", config)


def test_config_file_sits_between_defaults_and_flags(tmp_path):
    config = tmp_path / "options.toml"
    config.write_text("[advrbd]\nepsilon = 0.05\npgd_steps = 2\n")
    options = methods.resolve_options("advrbd", config, pgd_steps=7)
    assert options.epsilon == 0.05 and options.pgd_steps == 7 and options.arch == "resnet18"
    config.write_text("epsilon = [")
    with pytest.raises(InputError, match="not valid TOML"):
        methods.resolve_options("advrbd", config)
    for text, message in (("pgd_steps = 1" + "0" * 5000, "not valid TOML: a number of more than 4,300 digits$"),
                          ("epsilon = " + "[" * 5000 + "]" * 5000, "not valid TOML: nested too deeply")):
        config.write_text(text)  # a ValueError and a RecursionError, tracebacks before
        with pytest.raises(InputError, match=message):
            methods.resolve_options("advrbd", config)


def _manifest(totals: dict[str, int], suspect_labels: list[int], relabels: list[int] | None = None) -> dict:
    classes = list(totals)
    per_class = {name: {"total": total, "suspected": suspect_labels.count(i)} for i, (name, total) in
                 enumerate(totals.items())}
    relabels = suspect_labels if relabels is None else relabels
    return {"input": {"classes": classes}, "per_class": per_class,
            "suspects": [{"key": f"k{i}", "label": label, "relabel": relabel}
                         for i, (label, relabel) in enumerate(zip(suspect_labels, relabels))]}


def test_suspects_point_to_a_class_only_when_it_is_over_represented():
    totals = {"cat": 100, "dog": 100, "ship": 100, "frog": 100}
    # 30 of 40 suspects are cats, who are a quarter of the data: 3x their share.
    target = pipeline.suspect_target(_manifest(totals, [0] * 30 + [1] * 5 + [2] * 5))
    assert {k: v for k, v in target.items() if k != "p_value"} == \
        {"class": "cat", "label": 0, "share": 0.75, "lift": 3.0, "relabeled_away": 0.0}
    assert 0 < target["p_value"] < 1e-9
    # how many of the cats the clean model calls something else: 24 of 30 here (the dogs' relabels do not count)
    labels = [0] * 30 + [1] * 5 + [2] * 5
    relabels = [3] * 20 + [1] * 4 + [0] * 6 + [0] * 5 + [2] * 5
    assert pipeline.suspect_target(_manifest(totals, labels, relabels))["relabeled_away"] == 0.8
    # Half of all samples flagged, every cat among them: 2x, as a method flagging half the data always allows.
    assert pipeline.suspect_target(_manifest(totals, [0] * 100 + [1] * 50 + [2] * 50)) is None
    assert pipeline.suspect_target(_manifest(totals, [])) is None
    # A few suspects, most of one class: a lift of 3, and what chance gives 5% of the time.
    assert pipeline.suspect_target(_manifest(totals, [0] * 3 + [1])) is None


def test_binomial_tail_matches_the_sum_of_the_pmf():
    from math import comb
    for k, n, p in ((4, 10, 0.1), (0, 5, 0.3), (7, 7, 0.5), (30, 40, 0.25)):
        exact = sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert pipeline.binomial_tail(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert pipeline.binomial_tail(2600, 50000, 0.1) > 0.999  # tens of thousands of terms, no overflow
    assert pipeline.binomial_tail(5000, 5500, 0.1) < 1e-300


def test_detection_augmentation_follows_quick_unless_set(tmp_path):
    # Full scale: a flip-only warm-up (a corner trigger stays whole) and the crop in the enhancement.
    full = methods.resolve_options("advrbd")
    assert (full.detect_augment, full.enhance_augment) == ("flip", "crop")
    assert methods.resolve_options("advrbd", enhance_augment="flip").enhance_augment == "flip"
    assert methods.resolve_options("advrbd", detect_augment="crop").enhance_augment == "crop"
    assert methods.resolve_options("advrbd", quick=True).detect_augment == "none"
    assert methods.resolve_options("advrbd", quick=True, detect_augment="flip").detect_augment == "flip"
    config = tmp_path / "options.toml"
    config.write_text('[advrbd]\ndetect_augment = "none"\n')
    assert methods.resolve_options("advrbd", config).detect_augment == "none"
    for wrong in ("yes", True, 1):
        with pytest.raises(InputError, match="detect_augment must be one of 'crop', 'flip', 'none'"):
            methods.resolve_options("advrbd", detect_augment=wrong)
    # The enhancement follows the warm-up's augmentation unless set on its own.
    assert methods.resolve_options("advrbd", detect_augment="none").enhance_augment == "none"
    both = methods.resolve_options("advrbd", detect_augment="flip", enhance_augment="crop")
    assert (both.detect_augment, both.enhance_augment) == ("flip", "crop")


def test_a_run_under_quick_trains_with_the_values_set(make_shards, tmp_path):
    """The method runs the options as resolved: it must not scale them down a second time."""
    data = make_shards(120, per_shard=60)
    progress = RecordingProgress()
    sanitize.run(data, method="advrbd", out=tmp_path / "out", progress=progress, warmup_epochs=6, **FAST)
    steps_per_epoch = -(-120 // FAST["batch_size"])  # 120 samples at 64: no batch dropped
    assert progress.steps["warmup"][-1] == (6 * steps_per_epoch, 6 * steps_per_epoch)
    assert read_manifest(tmp_path / "out")["options"]["warmup_epochs"] == 6


@pytest.mark.parametrize("method, scaled, value", [("advrbd", "warmup_epochs", 10), ("advrbd", "batch_size", 512),
                                                   ("dbd", "ss_epochs", 10), ("dbd", "mixmatch_epochs", 7)])
def test_quick_scales_only_the_options_not_set(method, scaled, value, tmp_path):
    default = getattr(methods.resolve_options(method), scaled)
    quick = getattr(methods.resolve_options(method, quick=True), scaled)
    assert quick < default and value > quick  # the case where --quick would have cut the value
    assert getattr(methods.resolve_options(method, quick=True, **{scaled: value}), scaled) == value
    config = tmp_path / "options.toml"
    config.write_text(f"[{method}]\n{scaled} = {value}\n")
    assert getattr(methods.resolve_options(method, config, quick=True), scaled) == value
