"""Every registered attack on real CIFAR-10 images: its ground truth, and that its trigger does what it says."""
from __future__ import annotations

import numpy as np
import pytest

from sanitize.attacks import REGISTRY, make_attack
from sanitize.attacks.patterns import sinusoid
from sanitize.formats.records import InputError

RATE, TARGET, NUM_CLASSES = 0.05, 1, 10
# Label-Consistent trains a surrogate and runs PGD: a tiny model, one epoch, three steps.
FAST = {"label_consistent": dict(surrogate_arch="small", epochs=1, pgd_steps=3, batch_size=128)}


def build(name: str, **params):
    return make_attack(name, **{**FAST.get(name, {}), **params})


@pytest.fixture(scope="module")
def subset(cifar_arrays):
    images, labels = cifar_arrays
    return images[:300].copy(), labels[:300].copy()


@pytest.fixture(scope="module", params=list(REGISTRY))
def run(request, subset):
    """(name, attack, input images, input labels, input copy, Poisoned) for each attack, poisoned once."""
    images, labels = subset
    before = images.copy()
    attack = build(request.param)
    result = attack.poison(images, labels, rate=RATE, target=TARGET, seed=3, num_classes=NUM_CLASSES)
    return request.param, attack, images, labels, before, result


def test_registry_holds_every_attack():
    assert set(REGISTRY) == {"badnets", "blend", "sig", "wanet", "physicalba", "tact", "adaptive_blend",
                             "adaptive_patch", "label_consistent"}


def test_ground_truth(run):
    name, attack, images, labels, before, result = run
    count = len(labels)
    assert np.array_equal(images, before), "the input array was modified"
    assert result.images is not images and result.images.dtype == np.uint8 and result.images.shape == images.shape
    assert result.poisoned.sum() == round(RATE * count) and not result.warnings
    assert result.cover.sum() == round(attack.cover_rate * count)
    assert not (result.poisoned & result.cover).any()
    assert np.array_equal(result.true_labels, labels)
    if attack.clean_label:
        assert (labels[result.poisoned] == TARGET).all()
        assert np.array_equal(result.labels, labels)
    else:
        assert (result.labels[result.poisoned] == TARGET).all() and (labels[result.poisoned] != TARGET).all()
        assert np.array_equal(result.labels[~result.poisoned], labels[~result.poisoned])
    untouched = ~(result.poisoned | result.cover)
    assert np.array_equal(result.images[untouched], images[untouched])
    stamped = result.poisoned | result.cover
    changed = (result.images[stamped] != images[stamped]).any(axis=(1, 2, 3))
    assert changed.mean() > 0.9, f"{name}: only {changed.sum()} of {stamped.sum()} stamped rows changed"


class Recorder:
    """A progress that keeps what it is told: [(stage, [(done, total), ...]), ...]."""

    def __init__(self):
        self.seen = []

    def stage(self, name):
        self.seen.append((name, []))

    def advance(self, done, total):
        self.seen[-1][1].append((done, total))


def test_poison_is_deterministic_for_a_seed_and_reports_its_stages(run):
    name, attack, images, labels, _, result = run
    progress = Recorder()
    again = attack.poison(images, labels, rate=RATE, target=TARGET, seed=3, num_classes=NUM_CLASSES,
                          progress=progress)
    assert [stage for stage, _ in progress.seen] == list(attack.stages)
    if name == "label_consistent":  # the slow stages count their steps up to the end
        assert all(steps and steps[-1][0] == steps[-1][1] for _, steps in progress.seen)
        assert progress.seen[-1][1][-1] == (round(RATE * len(labels)),) * 2  # PGD counts the poisons
    assert np.array_equal(again.images, result.images) and np.array_equal(again.poisoned, result.poisoned)
    assert np.array_equal(again.cover, result.cover)
    if name != "label_consistent":  # a second surrogate would only slow the suite down
        other = attack.poison(images, labels, rate=RATE, target=TARGET, seed=4, num_classes=NUM_CLASSES)
        assert not np.array_equal(other.poisoned, result.poisoned)


def test_trigger_leaves_input_and_is_deterministic(run):
    name, attack, images, labels, _, _ = run
    test_images = images[:40].copy()
    triggered = attack.trigger(test_images, seed=1)
    assert np.array_equal(test_images, images[:40])
    assert triggered.shape == test_images.shape and triggered.dtype == np.uint8
    assert (triggered != test_images).any(axis=(1, 2, 3)).mean() > 0.9
    assert np.array_equal(attack.trigger(test_images, seed=1), triggered)
    if name != "tact":
        assert np.array_equal(attack.asr_mask(labels, TARGET), labels != TARGET)


def test_clean_label_cap_warns(subset):
    images, labels = subset
    result = make_attack("sig").poison(images, labels, rate=0.5, target=TARGET, seed=0, num_classes=NUM_CLASSES)
    assert result.poisoned.sum() == (labels == TARGET).sum()
    assert result.warnings and "eligible" in result.warnings[0]


@pytest.mark.parametrize("name, kept", [("sig", lambda labels: labels != TARGET),
                                        ("tact", lambda labels: labels != TARGET + 1),
                                        ("badnets", lambda labels: labels == TARGET)])
def test_no_eligible_sample_is_an_error_not_a_copy_without_poisons(subset, name, kept):
    """SIG on a set without a readable image of its target class wrote a copy with no poison and exited 0."""
    images, labels = subset
    rows = kept(labels)
    attack = make_attack(name, **({"source_classes": (TARGET + 1,)} if name == "tact" else {}))
    with pytest.raises(InputError, match=f"no sample is eligible for {name} with target class {TARGET}"):
        attack.poison(images[rows], labels[rows], rate=0.1, target=TARGET, seed=0, num_classes=NUM_CLASSES)
    # a rate too small for one poison stays a warning: nothing was asked for that could not be done
    assert attack.poison(images[rows], labels[rows], rate=1e-9, target=TARGET, seed=0,
                         num_classes=NUM_CLASSES).poisoned.sum() == 0


def test_badnets_patch_is_the_pattern(subset):
    images, _ = subset
    triggered = make_attack("badnets").trigger(images[:20])
    assert (triggered[:, -3:, -3:] == 255).all()
    assert np.array_equal(triggered[:, :-3], images[:20, :-3])
    assert np.array_equal(triggered[:, :, :-3], images[:20, :, :-3])
    checker = make_attack("badnets", kind="checkerboard").trigger(images[:20])
    assert np.array_equal(checker[0, -3:, -3:, 0], [[255, 0, 255], [0, 255, 0], [255, 0, 255]])


def test_patterns_scale_with_the_image(subset):
    images, _ = subset
    large = images[:4].repeat(2, axis=1).repeat(2, axis=2)  # 64 px
    triggered = make_attack("badnets").trigger(large)
    assert (triggered[:, -6:, -6:] == 255).all()
    assert np.array_equal(triggered[:, :-6], large[:, :-6]) and np.array_equal(triggered[:, :, :-6], large[:, :, :-6])
    assert make_attack("wanet").trigger(large).shape == large.shape


def test_blend_is_a_convex_mix(subset):
    images, _ = subset
    attack = make_attack("blend")
    expected = (1 - attack.alpha) * images[:20].astype(np.float32) + attack.alpha * attack.key.pattern
    assert np.abs(attack.trigger(images[:20]) - expected).max() <= 0.5 + 1e-4


def test_sig_adds_the_sinusoid(subset):
    images, _ = subset
    columns = np.arange(32)
    signal = 20 * np.sin(2 * np.pi * columns * 6 / 32)
    expected = np.clip(images[:20].astype(np.float32) + signal[None, None, :, None], 0, 255)
    assert np.abs(make_attack("sig").trigger(images[:20]) - expected).max() <= 0.5 + 1e-4
    assert np.allclose(sinusoid(4, 32, 20, 6)[0, :, 0], signal, atol=1e-4)


def test_wanet_moves_pixels_but_keeps_the_image(subset):
    images, _ = subset
    attack = make_attack("wanet")
    flat = np.full((2, 32, 32, 3), 117, dtype=np.uint8)
    assert np.array_equal(attack.trigger(flat), flat), "a warp must not change a constant image"
    difference = np.abs(attack.trigger(images[:40]).astype(int) - images[:40])
    assert 0.5 < difference.mean() < 10
    noisy = attack.stamp_cover(images[:40].astype(np.float32), np.random.default_rng(0))
    assert 0 < np.abs(noisy - attack.trigger(images[:40])).mean() < 10, "noise mode jitters the same warp"


def test_physicalba_without_transformations_is_the_logo(subset):
    images, _ = subset
    still = make_attack("physicalba", flip_prob=0, degrees=0, translate=0, scale_min=1, scale_max=1,
                        brightness=0, contrast=0)
    triggered = still.trigger(images[:20])
    assert np.array_equal(triggered[:, -8:, -8:], np.broadcast_to(still.logo.pattern[-8:, -8:], (20, 8, 8, 3)))
    assert np.array_equal(triggered[:, :-8], images[:20, :-8])
    moving = make_attack("physicalba")
    assert not np.array_equal(moving.trigger(images[:20], seed=0), moving.trigger(images[:20], seed=1))
    correlation = np.corrcoef(moving.trigger(images[:20]).ravel().astype(float), images[:20].ravel())[0, 1]
    assert correlation > 0.5, "the transformations should distort, not replace, the image"


def test_tact_poisons_only_sources_and_covers_others(subset):
    images, labels = subset
    attack = make_attack("tact", source_classes="0,2")
    result = attack.poison(images, labels, rate=0.05, target=TARGET, seed=0, num_classes=NUM_CLASSES)
    assert set(labels[result.poisoned]) <= {0, 2}
    assert not set(labels[result.cover]) & {0, 1, 2}
    assert np.array_equal(attack.asr_mask(labels, TARGET), np.isin(labels, [0, 2]))
    assert (result.images[result.cover][:, -3:, -3:] == 255).all()
    with pytest.raises(InputError, match="source class"):
        attack.poison(images, labels, rate=0.05, target=2, seed=0, num_classes=NUM_CLASSES)


def test_adaptive_blend_stamps_half_the_pieces(subset):
    images, labels = subset
    attack = make_attack("adaptive_blend")
    result = attack.poison(images, labels, rate=RATE, target=TARGET, seed=0, num_classes=NUM_CLASSES)
    blended = (1 - attack.alpha) * images.astype(np.float32) + attack.alpha * attack.key.pattern
    for row in np.flatnonzero(result.poisoned | result.cover):
        pieces = [(slice(r, r + 8), slice(c, c + 8)) for r in range(0, 32, 8) for c in range(0, 32, 8)]
        hidden = [np.array_equal(result.images[row][p], images[row][p]) for p in pieces]
        assert sum(hidden) == 8
        for piece, is_hidden in zip(pieces, hidden):
            if not is_hidden:
                assert np.abs(result.images[row][piece] - blended[row][piece]).max() <= 0.5 + 1e-4
    expected = (1 - attack.test_alpha) * images[:20].astype(np.float32) + attack.test_alpha * attack.key.pattern
    assert np.abs(attack.trigger(images[:20]) - expected).max() <= 0.5 + 1e-4


def test_adaptive_patch_trains_on_one_faint_patch_and_tests_on_all(subset):
    images, labels = subset
    attack = make_attack("adaptive_patch")
    patches = attack.patches()
    triggered = attack.trigger(images[:20])
    for patch in patches:
        region = patch.mask > 0
        assert np.array_equal(triggered[:, region], np.broadcast_to(patch.pattern[region], triggered[:, region].shape))
    outside = sum(patch.mask for patch in patches) == 0
    assert np.array_equal(triggered[:, outside], images[:20, outside])
    result = attack.poison(images, labels, rate=RATE, target=TARGET, seed=0, num_classes=NUM_CLASSES)
    for row in np.flatnonzero(result.poisoned | result.cover):
        touched = [(result.images[row][patch.mask > 0] != images[row][patch.mask > 0]).any() for patch in patches]
        assert sum(touched) == 1, "each training sample carries exactly one patch"


@pytest.mark.parametrize("run", ["label_consistent"], indirect=True)
def test_label_consistent_perturbs_within_eps_then_stamps_corners(run):
    _, attack, images, _, _, result = run
    corners = attack.corners.mask > 0
    rows = result.poisoned
    assert np.array_equal(result.images[rows][:, corners], np.broadcast_to(attack.corners.pattern[corners],
                                                                          result.images[rows][:, corners].shape))
    inner = result.images[rows][:, ~corners].astype(int) - images[rows][:, ~corners]
    assert np.abs(inner).max() <= round(attack.eps * 255) and np.abs(inner).mean() > 1, "PGD stays in the eps ball"
    triggered = attack.trigger(images[:10])
    assert np.array_equal(triggered[:, ~corners], images[:10, ~corners])
    assert (triggered[:, :3, :3, 0] == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]).all()


def test_make_attack_rejects_unknown_names_and_parameters():
    with pytest.raises(InputError, match="badnets"):
        make_attack("nope")
    with pytest.raises(InputError, match="valid: size, kind, corner"):
        make_attack("badnets", colour="red")
    with pytest.raises(InputError, match="must be a whole number"):
        make_attack("badnets", size="big")
    with pytest.raises(InputError, match="whole number"):
        make_attack("badnets", size=2.5)
    with pytest.raises(InputError, match="between 0 and 1"):
        make_attack("blend", alpha=2)
    assert make_attack("blend", alpha="0.3").alpha == 0.3
    assert make_attack("tact", source_classes=[3, 4]).params["source_classes"] == [3, 4]
    assert make_attack("tact", source_classes=2).source_classes == (2,)  # one value is a list of one
    assert make_attack("adaptive_patch", alphas="0.3").alphas == (0.3,)
    with pytest.raises(InputError, match="source_classes must be a list of int"):
        make_attack("tact", source_classes=[1.7])  # never silently class 1


@pytest.mark.parametrize("name, params", [
    ("sig", {"frequency": float("nan")}), ("wanet", {"s": "NaN"}), ("wanet", {"grid_rescale": "Infinity"}),
    ("physicalba", {"degrees": float("nan")}), ("physicalba", {"scale_max": float("inf")}),
    ("label_consistent", {"lr": float("nan")}), ("badnets", {"size": float("inf")}),
    ("adaptive_patch", {"alphas": [0.2, float("nan")]}),
    ("sig", {"frequency": 1e39}),  # inf in float32: black poisons
])
def test_attack_parameters_must_be_finite(name, params):
    """NaN slipped past every bound and made all-black poisons, and NaN into truth.json."""
    with pytest.raises(InputError, match="must be a (finite|whole) number|must be a list of float|within float32"):
        make_attack(name, **params)


@pytest.mark.parametrize("name, params, message", [
    ("blend", {"pattern_seed": -1}, "pattern_seed must be at least 0"),  # numpy raised ValueError
    ("wanet", {"k": 100000}, "k must be between 2 and 32"),  # asked for 149 GiB
    ("wanet", {"s": 0}, "s must be above 0"),
    ("wanet", {"s": 1e30}, "s must be above 0 and at most 32"),  # near-white poisons
    ("wanet", {"grid_rescale": 3}, "grid_rescale must be above 0 and at most 2"),
    ("sig", {"frequency": 0}, "frequency must be above 0"),
    ("physicalba", {"degrees": -5}, "degrees must be between 0 and 180"),
    ("adaptive_blend", {"pieces": -4}, "pieces must be a square number"),  # TypeError (complex root)
    ("label_consistent", {"batch_size": 0}, "batch_size must be at least 1"),  # ZeroDivisionError
    ("label_consistent", {"pgd_steps": -1}, "pgd_steps must be at least 1"),  # silently no PGD
    ("label_consistent", {"epochs": 0}, "epochs must be at least 1"),
    ("label_consistent", {"lr": 0}, "lr must be above 0"),
])
def test_attack_parameters_out_of_range_are_user_errors(name, params, message):
    with pytest.raises(InputError, match=message):
        make_attack(name, **params)


def test_adaptive_patch_deals_its_patches_to_images_stamped_one_at_a_time(subset):
    """An image stamped at its own size is a batch of one; it used to get the first patch every time."""
    images, _ = subset
    attack = build("adaptive_patch")
    rng = np.random.default_rng(0)
    corners = set()
    for image in images[:40]:
        stamped = attack.stamp(image[None].astype(np.float32), rng)[0]
        changed = np.argwhere((stamped != image).any(axis=-1))
        corners.add((int(changed[:, 0].mean() > 16), int(changed[:, 1].mean() > 16)))
    assert len(corners) == len(attack.alphas)


def test_a_rate_that_rounds_to_nothing_says_so(subset):
    images, labels = subset
    result = build("badnets").poison(images, labels, rate=0.001, target=TARGET, seed=0, num_classes=NUM_CLASSES)
    assert not result.poisoned.any() and "rounds to no poisoned sample" in result.warnings[0]
    assert not build("badnets").poison(images, labels, rate=0, target=TARGET, seed=0,
                                       num_classes=NUM_CLASSES).warnings


def test_poison_rejects_bad_inputs(subset):
    images, labels = subset
    attack = make_attack("badnets")
    with pytest.raises(InputError, match="target class"):
        attack.poison(images, labels, rate=0.1, target=10, seed=0, num_classes=NUM_CLASSES)
    with pytest.raises(InputError, match="uint8"):
        attack.poison(images.astype(np.float32), labels, rate=0.1, target=1, seed=0, num_classes=NUM_CLASSES)
    with pytest.raises(InputError, match="rate"):
        attack.poison(images, labels, rate=1.5, target=1, seed=0, num_classes=NUM_CLASSES)


def test_success_rate_counts_triggered_non_target_images_sent_to_the_target(subset):
    images, labels = subset
    attack = build("badnets")
    seen = []

    def spy(batch):
        seen.append(batch)
        return np.full(len(batch), TARGET)

    assert attack.success_rate(spy, images, labels, TARGET) == 100.0
    assert len(seen[0]) == int((labels != TARGET).sum())
    assert np.array_equal(seen[0], attack.trigger(images[labels != TARGET]))  # triggered, not the clean images
    assert attack.success_rate(lambda batch: np.zeros(len(batch), int) + TARGET + 1, images, labels, TARGET) == 0.0
    assert np.isnan(attack.success_rate(spy, images[labels == TARGET], labels[labels == TARGET], TARGET))
