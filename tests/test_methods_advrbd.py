"""AdvrBD stage contracts on real CIFAR-10 images with a planted BadNets-style patch."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from sanitize import train
from sanitize.data import Bank, make_generator
from sanitize.methods import advrbd
from sanitize.models import build_model

TARGET = 0


def plant_patch(images: np.ndarray, labels: np.ndarray, rate: float, seed: int = 0):
    """A 3x3 checkerboard in the bottom-right corner and the target label on ``rate`` of the non-target samples."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(np.flatnonzero(labels != TARGET), round(rate * len(labels)), replace=False)
    images, labels = images.copy(), labels.copy()
    checker = (np.indices((3, 3)).sum(0) % 2 * 255).astype(np.uint8)[..., None]
    images[chosen, -4:-1, -4:-1] = checker
    labels[chosen] = TARGET
    poisoned = np.zeros(len(labels), dtype=bool)
    poisoned[chosen] = True
    return images, labels, poisoned


@pytest.fixture(scope="module")
def poisoned_bank(cifar_arrays, cifar_classes):
    images, labels, poisoned = plant_patch(*cifar_arrays, rate=0.1)
    return Bank.from_arrays(images, labels, cifar_classes), poisoned


@pytest.fixture(scope="module")
def result(poisoned_bank):
    bank, _ = poisoned_bank
    return advrbd.run(bank, advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64).scaled())


def sized(*sizes):
    """Labels: ``sizes[c]`` samples of class c."""
    return torch.cat([torch.full((size,), index) for index, size in enumerate(sizes)])


def auroc(score, positive):
    order = np.argsort(score)
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    n_pos = positive.sum()
    return (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (~positive).sum())


def test_patch_masks_are_squares_of_the_given_fraction():
    masks = advrbd.patch_masks(50, (32, 32), 0.5, make_generator(0, "cpu"))
    assert masks.shape == (50, 1, 32, 32)
    assert (masks.sum((1, 2, 3)) == 16 * 16).all()
    corners = {tuple(torch.nonzero(m[0])[0].tolist()) for m in masks}
    assert len(corners) > 10  # drawn per sample


def test_pgd_finds_a_larger_kl_than_random_noise_and_none_without_a_budget(poisoned_bank):
    bank, _ = poisoned_bank
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    indices = torch.arange(32)

    def kl(**options):
        return advrbd.robustness_kl(model, bank, indices, advrbd.AdvrbdOptions(batch_size=16, **options), seed=0)

    none, noise, pgd = kl(epsilon=0.0), kl(pgd_steps=0), kl(pgd_steps=5)
    assert none.shape == (32,) and torch.allclose(none, torch.zeros(32), atol=1e-6)
    assert (pgd >= -1e-6).all() and pgd.mean() > 3 * noise.mean()


def test_more_masks_make_the_score_depend_less_on_the_seed(poisoned_bank):
    bank, _ = poisoned_bank
    torch.manual_seed(0)
    model = build_model("small", bank.num_classes, bank.image_size, bank.mean, bank.std)
    indices = torch.arange(128)

    def agreement(masks):  # rank correlation of the scores under two seeds
        first, second = (advrbd.robustness_kl(model, bank, indices, advrbd.AdvrbdOptions(
            batch_size=64, pgd_steps=2, score_masks=masks), seed=seed) for seed in (0, 1))
        ranks = [torch.argsort(torch.argsort(v)).float() for v in (first, second)]
        return float(torch.corrcoef(torch.stack(ranks))[0, 1])

    assert agreement(4) > agreement(1) + 0.05


def test_grow_unlearn_set_takes_the_least_robust_of_the_rest():
    unlearn = torch.tensor([True, False, False, False, False])
    rest = torch.tensor([1, 2, 3, 4])
    grown = advrbd.grow_unlearn_set(unlearn, torch.tensor([0.1, 0.9, 0.5, 0.7]), rest, 2)
    assert grown.tolist() == [True, False, True, False, True]
    # only fitted samples are eligible: sample 2 (KL 0.9) is not, so 4 and 3 go
    eligible = torch.tensor([True, True, False, True, True])
    grown = advrbd.grow_unlearn_set(unlearn, torch.tensor([0.1, 0.9, 0.5, 0.7]), rest, 2, eligible)
    assert grown.tolist() == [True, False, False, True, True]


def test_unlearn_candidates_follow_the_options():
    margin = torch.tensor([-0.5, 0.2, 0.5, 0.8])
    options = advrbd.AdvrbdOptions(split_margin=0.5)
    assert advrbd.unlearn_candidates(options, margin) is None
    assert advrbd.unlearn_candidates(replace(options, unlearn_fitted_only=True), margin).tolist() == \
        [False, True, True, True]
    # a sample the split would flag (margin > 0.5) is never unlearned
    assert advrbd.unlearn_candidates(replace(options, unlearn_skips_suspects=True), margin).tolist() == \
        [True, True, True, False]
    both = replace(options, unlearn_fitted_only=True, unlearn_skips_suspects=True)
    assert advrbd.unlearn_candidates(both, margin).tolist() == [False, True, True, False]
    # unlearn_pool: only the least robust share by the warm-up KL, whatever the round's margin says
    warmup_kl = torch.tensor([0.9, 0.1, 0.5, 0.7])
    assert advrbd.unlearn_pool(options, warmup_kl) is None
    pool = advrbd.unlearn_pool(replace(options, unlearn_pool=0.5), warmup_kl)
    assert pool.tolist() == [True, False, False, True]
    assert advrbd.unlearn_candidates(options, margin, pool).tolist() == pool.tolist()
    assert advrbd.unlearn_candidates(both, margin, pool).tolist() == [False, False, False, False]


def test_clean_label_rule_keeps_relabel_equals_given_suspects_out():
    suspected = torch.tensor([True, True, False, False])
    given = torch.tensor([0, 0, 0, 3])
    relabel = torch.tensor([0, 5, 0, 1])
    assert advrbd.keep_for_finetune(suspected, relabel, given).tolist() == [False, True, True, True]


def test_a_split_that_flags_most_samples_warns_and_names_a_dominant_class():
    classes = ["airplane", "bird", "cat"]
    labels = torch.tensor([0] * 90 + [1] * 5 + [2] * 5)
    few = torch.zeros(100, dtype=torch.bool)
    few[:10] = True
    assert advrbd.verdict_warnings(labels, few, classes) == []
    most = labels == 0  # a dominant class flagged wholesale
    warning, = advrbd.verdict_warnings(labels, most, classes)
    assert warning.startswith("90 of 100 samples are suspected (90%)") and "class 'airplane' holds 90%" in warning
    assert "trained on the 10 others" in warning
    warning, = advrbd.verdict_warnings(torch.tensor([0, 1] * 50), torch.ones(100, dtype=torch.bool), classes)
    assert "holds" not in warning and "trained on no sample" in warning


def test_a_class_flagged_mostly_and_relabeled_to_itself_is_named_when_the_whole_is_not():
    """A clean 2-class set had 35 of its 41 airplanes flagged, all relabeled airplane, with no warning: under
    half of all samples. Flagged samples relabeled away are a dirty-label backdoor's poisons: no warning."""
    classes = ["airplane", "bird", "cat"]
    labels = torch.tensor([0] * 40 + [1] * 50 + [2] * 10)
    suspected = torch.zeros(100, dtype=torch.bool)
    suspected[:35] = True  # 35 of the 40 airplanes
    suspected[90:99] = True  # 9 of the 10 cats: too small a class to say anything
    assert advrbd.verdict_warnings(labels, suspected, classes, labels.clone()) == [
        "35 of the 40 samples labeled 'airplane' are suspected (88%) and the clean model gives 35 of them that "
        "label back: its clean samples flagged wholesale, or a clean-label backdoor aimed at it; the clean model "
        "saw 5 of its samples"]
    away = labels.clone()
    away[:20] = 1  # 20 of the 35 relabeled bird: the poisons of a backdoor aimed at airplane
    assert advrbd.verdict_warnings(labels, suspected, classes, away) == []
    assert advrbd.verdict_warnings(labels, suspected, classes) == []  # without the relabels, nothing to say
    suspected[15:35] = False  # 15 of 40: no warning
    assert advrbd.verdict_warnings(labels, suspected, classes, labels.clone()) == []


def test_scores_rank_planted_poisons_above_clean_samples(poisoned_bank, result):
    _, poisoned = poisoned_bank
    assert auroc(result.score, poisoned) > 0.85
    assert result.suspected[poisoned].mean() > 0.7


def test_result_honours_the_seam(poisoned_bank, result):
    bank, _ = poisoned_bank
    assert result.score.shape == (bank.n,) and result.score.dtype == np.float64
    assert result.suspected.dtype == bool and result.relabel.dtype == np.int64
    assert set(result.timings_s) == set(advrbd.STAGES)
    assert not result.model.training
    assert result.warnings == []  # a few percent poisoned: nothing to warn about


def test_split_is_consistent_with_the_scores(result):
    margin = advrbd.AdvrbdOptions().split_margin
    assert np.array_equal(result.suspected, result.score > margin)


def test_fine_tuning_obeyed_the_clean_label_rule(poisoned_bank, result):
    bank, _ = poisoned_bank
    kept, label = result.details["finetune_kept"], result.details["finetune_label"]
    excluded = result.suspected & (label == bank.labels.numpy())
    assert np.array_equal(kept, ~excluded)
    assert result.metrics["finetune_excluded"] == int(excluded.sum())


def test_the_returned_models_doubt_in_each_given_label_is_kept(poisoned_bank, result):
    bank, _ = poisoned_bank
    doubt = result.details["relabel_doubt"]
    assert doubt.shape == (bank.n,) and ((doubt >= 0) & (doubt <= 1)).all()
    relabeled = result.relabel != bank.labels.numpy()  # another class outranks the given one: p(given) <= 1/2
    assert relabeled.any() and (doubt[relabeled] >= 0.5 - 1e-6).all()
    logits = train.predict_logits(result.model, bank.images[:8])
    assert np.allclose(doubt[:8], 1 - logits.softmax(1)[torch.arange(8), bank.labels[:8]].numpy(), atol=1e-5)


def test_the_forget_set_is_the_top_share_by_score_less_the_samples_kept():
    score = torch.tensor([0.9, 0.1, 0.99, 0.8, 0.95, 0.2, 0.3, 0.4, 0.5, 0.6])
    kept = torch.tensor([True, True, False, False, True, False, False, False, False, False])
    # the top 40%: samples 2, 4, 0, 3; of them 2 and 3 are not kept
    assert advrbd.finetune_forget(score, kept, 0.4).nonzero().squeeze(1).tolist() == [2, 3]
    assert advrbd.finetune_forget(score, kept, 0.0).nonzero().squeeze(1).tolist() == []
    assert advrbd.finetune_forget(score, torch.ones(10, dtype=torch.bool), 0.5).nonzero().squeeze(1).tolist() == []


@pytest.mark.parametrize("share", [0.0, 0.05])
def test_fine_tuning_is_given_the_forget_set_the_option_asks_for(poisoned_bank, monkeypatch, share):
    """The suspects of class 1 keep their label (the clean model agrees); with finetune_unlearn the
    top-scored of them are unlearned beside fine-tuning, never a sample fine-tuning learns."""
    from sanitize import train

    bank, _ = poisoned_bank
    ones = (bank.labels == 1).nonzero().squeeze(1)
    flagged = torch.zeros(bank.n, dtype=torch.bool)
    flagged[ones[::2]] = True
    score = flagged.float() * 0.5 + torch.linspace(0, 0.4, bank.n)  # the flagged samples first
    monkeypatch.setattr(advrbd, "detect", lambda *a, **k: advrbd.Detection(
        score, flagged, torch.zeros(bank.n), torch.full((bank.n,), -1, dtype=torch.int16)))
    forgets = []
    real = train.train_supervised
    monkeypatch.setattr(train, "train_supervised", lambda *a, **k: forgets.append(k.get("forget")) or real(*a, **k))
    found = advrbd.run(bank, advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64,
                                                  finetune_unlearn=share).scaled())
    assert forgets[0] is None  # the clean model learns, it unlearns nothing
    kept = torch.from_numpy(found.details["finetune_kept"])
    assert torch.equal(forgets[1], advrbd.finetune_forget(score, kept, share).nonzero().squeeze(1))
    assert (len(forgets[1]) > 0) == (share > 0) and not kept[forgets[1]].any()
    assert np.array_equal(found.details["finetune_unlearned"].nonzero()[0], forgets[1].numpy())
    assert found.metrics["finetune_unlearned"] == len(forgets[1])


def test_warm_up_and_enhancement_train_with_their_own_augmentation(poisoned_bank, monkeypatch):
    from sanitize import train
    from sanitize.methods.base import StageClock

    seen = []
    for name in ("train_supervised", "unlearn_relearn"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _real=real, _name=name, **k:
                            seen.append((_name, k["augmentation"])) or _real(*a, **{**k, "epochs": 1}))
    bank, _ = poisoned_bank
    opts = advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64, enhance_rounds=2,
                                detect_augment="flip", enhance_augment="crop").scaled()
    advrbd.detect(bank, opts, StageClock(bank.device), {})
    assert seen == [("train_supervised", "flip"), ("unlearn_relearn", "crop"), ("unlearn_relearn", "crop")]


def test_imbalance_is_judged_without_the_largest_and_the_smallest_class():
    """A poisoning inflates its target class (and TaCT depletes its source class): a balanced set stays
    balanced at any rate."""
    assert not advrbd.imbalanced(sized(4000 + 5000, 4000, 4000, 4000, 4000), 5)  # 20% poisons into class 0
    assert not advrbd.imbalanced(sized(3750 + 6250, 3750, 3750, 3750, 3750), 5)  # 25%
    assert not advrbd.imbalanced(sized(45 + 10, 45, 0), 3)  # a balanced pair, 10% poisons into one
    assert not advrbd.imbalanced(sized(7500, 2500, 5000, 5000, 5000), 5)  # TaCT: all from one source class
    assert advrbd.imbalanced(sized(800, 480, 172, 37, 8), 5)  # long-tailed
    assert not advrbd.imbalanced(sized(50, 50, 50, 0, 0), 5)  # empty classes aside
    assert advrbd.imbalanced(sized(60, 50, 20, 10), 4)
    assert not advrbd.imbalanced(sized(60, 50, 10), 3)  # too few classes to tell


def test_a_class_that_dominates_beyond_what_a_poisoning_adds_makes_the_set_imbalanced():
    """A largest class more than 30% of the data above the next: no backdoor poisons that much."""
    assert advrbd.imbalanced(sized(90, 5, 5, 5), 4)  # a "normal" class beside rare ones
    assert advrbd.imbalanced(sized(80, 20), 2)
    assert advrbd.imbalanced(sized(2000, *[333] * 9), 10)  # 40% of the data beside nine equal classes
    assert not advrbd.imbalanced(sized(60, 40), 2)
    assert not advrbd.imbalanced(sized(100), 1)


def test_the_detection_adjusts_its_margins_on_imbalanced_data_only(poisoned_bank, monkeypatch):
    from sanitize import train
    from sanitize.methods.base import StageClock

    shifts = []
    real_margin, real_relearn = advrbd.given_label_margin, train.unlearn_relearn
    monkeypatch.setattr(advrbd, "given_label_margin", lambda model, bank, shift=None: shifts.append(shift) or
                        real_margin(model, bank, shift))
    monkeypatch.setattr(train, "unlearn_relearn", lambda *a, **k: real_relearn(*a, **{**k, "epochs": 1}))
    bank, _ = poisoned_bank  # balanced, 5% poisons: the target class inflated, the rest as they were
    opts = advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64, enhance_rounds=1, warmup_epochs=1).scaled()
    metrics = {}
    advrbd.detect(bank, opts, StageClock(bank.device), metrics)
    assert shifts == [None] and metrics["logit_adjust"] == 0
    keep = torch.cat([(bank.labels == label).nonzero()[:, 0][:max(4, 60 // (label + 1))] for label in range(10)])
    tail = Bank(bank.images[keep], bank.labels[keep], bank.classes, bank.mean, bank.std)
    shifts.clear()
    found = advrbd.detect(tail, opts, StageClock(bank.device), metrics)
    assert len(shifts) == 1 and torch.allclose(shifts[0], train.class_log_prior(tail.labels, 10))
    assert metrics["logit_adjust"] == 1 and found.suspected.tolist() == (found.score > opts.split_margin).tolist()
    shifts.clear()
    advrbd.detect(tail, replace(opts, logit_adjust=0.0), StageClock(bank.device), metrics)
    assert shifts == [None]  # a value set is a value kept
    shifts.clear()
    advrbd.detect(tail, replace(opts, enhance_rounds=0), StageClock(bank.device), metrics)
    assert len(shifts) == 1 and shifts[0] is not None  # no round ran: the warm-up model's margins, adjusted too


def test_the_margin_less_the_class_log_prior_leaves_a_model_that_only_predicts_the_prior_undecided():
    shares = torch.tensor([0.6, 0.2, 0.2])

    class Prior(torch.nn.Module):  # logits that carry the class prior and nothing else
        def forward(self, images):
            return shares.log().expand(len(images), 3)

    labels = torch.tensor([0] * 6 + [1] * 2 + [2] * 2)
    bank = Bank(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), labels, ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3)
    plain = advrbd.given_label_margin(Prior(), bank)
    assert torch.allclose(plain[:6], torch.tensor(0.4)) and torch.allclose(plain[6:], torch.tensor(-0.4))
    shift = torch.tensor([0.6, 0.2, 0.2]).log()
    assert torch.allclose(advrbd.given_label_margin(Prior(), bank, shift), torch.zeros(10), atol=1e-6)


def test_no_sample_outside_the_pool_is_ever_unlearned_or_rescored(poisoned_bank, monkeypatch):
    from sanitize.methods.base import StageClock

    scored = []
    real = advrbd.robustness_kl
    monkeypatch.setattr(advrbd, "robustness_kl", lambda model, bank, indices, *a, **k:
                        scored.append(indices.clone()) or real(model, bank, indices, *a, **k))
    bank, _ = poisoned_bank
    opts = advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64, warmup_epochs=1, enhance_rounds=4,
                                partition_rate=0.1, unlearn_pool=0.3).scaled()
    found = advrbd.detect(bank, opts, StageClock(bank.device), {})
    pool = advrbd.unlearn_pool(opts, found.warmup_kl)
    unlearned = found.unlearn_round >= 0
    # the partition and three growths of 10% each: the pool of 30% runs dry in the last round
    assert int(pool.sum()) == round(0.3 * bank.n) and not (unlearned & ~pool).any()
    assert int(unlearned.sum()) == int(pool.sum())
    # the warm-up scores everything; each re-scoring only the pool's rest (20%, then 10%, of the data)
    step = advrbd.partition_size(opts, bank.n)
    assert len(scored[0]) == bank.n
    assert [len(indices) for indices in scored[1:]] == [int(pool.sum()) - step, int(pool.sum()) - 2 * step]
    for round_index, indices in enumerate(scored[1:], start=1):
        before = (found.unlearn_round >= 0) & (found.unlearn_round < round_index)
        assert pool[indices].all() and not before[indices].any()


def test_an_exhausted_pool_ends_the_growth_not_the_run(poisoned_bank):
    from sanitize.methods.base import StageClock

    bank, _ = poisoned_bank
    opts = advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64, warmup_epochs=1, enhance_rounds=4,
                                partition_rate=0.05, unlearn_pool=0.1).scaled()
    metrics = {}
    found = advrbd.detect(bank, opts, StageClock(bank.device), metrics)
    # the pool is gone after one growth; the later rounds still train, with nothing left to score
    assert metrics["enhance_rounds"] == 4
    assert int((found.unlearn_round >= 0).sum()) == round(0.1 * bank.n)
    assert int(found.unlearn_round.max()) == 1


@pytest.mark.parametrize("rebalance", [False, True])
def test_fine_tuning_is_trained_for_the_prior_of_the_relabeled_set(poisoned_bank, monkeypatch, rebalance):
    """The clean-label rule thins out a class whose suspects keep their label (here: every other sample of
    class 1 flagged); with finetune_rebalance the fine-tuning's loss is adjusted from the kept samples'
    class prior to the relabeled set's, which raises that class."""
    from sanitize import train

    bank, _ = poisoned_bank
    ones = (bank.labels == 1).nonzero().squeeze(1)
    flagged = torch.zeros(bank.n, dtype=torch.bool)
    flagged[ones[::2]] = True
    monkeypatch.setattr(advrbd, "detect", lambda *a, **k: advrbd.Detection(
        flagged.float(), flagged, torch.zeros(bank.n), torch.full((bank.n,), -1, dtype=torch.int16)))
    shifts = []
    real = train.train_supervised
    monkeypatch.setattr(train, "train_supervised", lambda *a, **k: shifts.append(k.get("logit_shift")) or real(*a, **k))
    found = advrbd.run(bank, advrbd.AdvrbdOptions(arch="small", quick=True, batch_size=64,
                                                  finetune_rebalance=rebalance).scaled())
    assert shifts[0] is None  # the clean model trains for the data as it is
    if not rebalance:
        assert shifts[1] is None and "finetune_prior_shift" not in found.metrics
        return
    kept, label = torch.from_numpy(found.details["finetune_kept"]), torch.from_numpy(found.details["finetune_label"])
    expected = train.prior_shift(label[kept], label, bank.num_classes)
    assert torch.equal(shifts[1], expected)
    assert found.metrics["finetune_prior_shift"] == [round(float(value), 4) for value in expected]
    assert int((~kept).sum()) > 0 and int(expected.argmin()) == 1  # the thinned class is the one raised


def test_suspects_are_relabeled_for_the_prior_asked_for():
    """Two classes; the clean model trained on 90 / 10 (the split flagged most of class 1). A suspect it finds
    slightly more like class 0 goes to class 1 once the data's prior (90 / 170) counts."""
    labels = torch.tensor([0] * 90 + [1] * 10 + [1] * 160)
    suspected = torch.tensor([False] * 100 + [True] * 160)
    bank = Bank.from_arrays(np.zeros((260, 8, 8, 3), np.uint8), labels.numpy(), ["a", "b"])
    # The clean model's logits: its training prior, plus evidence slightly for class 0 on the first 40
    # suspects and clearly for class 1 on the other 120.
    evidence = torch.zeros(260, 2)
    evidence[100:140, 0] = 0.5
    evidence[140:, 1] = 4.0
    logits = evidence + torch.tensor([0.9, 0.1]).log()
    for prior, moved in (("model", 0), ("data", 40)):
        relabel = advrbd.suspect_relabels(logits, bank, suspected, prior)
        assert torch.equal(relabel[:100], labels[:100])  # the others keep their given label
        assert int((relabel[100:140] == 1).sum()) == moved, prior
        assert bool((relabel[140:] == 1).all()), prior
