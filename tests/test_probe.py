import math

import numpy as np
import torch

from sista_core.probe import macro_auroc, standardise, train_linear_probe


def test_macro_auroc_on_hand_made_scores():
    labels = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.float32)
    logits = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.1, 0.2], [0.2, 0.4]])
    mean, per_label = macro_auroc(logits, labels)
    # label 0 perfectly ranked (1.0); label 1: positives 0.3, 0.4 vs negatives 0.1, 0.2 -> 1.0
    assert per_label == [1.0, 1.0] and mean == 1.0
    flipped, _ = macro_auroc(-logits, labels)
    assert flipped == 0.0


def test_a_label_with_one_class_is_left_out_not_counted_as_zero():
    labels = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=torch.float32)
    logits = torch.tensor([[0.9, 0.5], [0.1, 0.5], [0.8, 0.5], [0.2, 0.5]])
    mean, per_label = macro_auroc(logits, labels)
    assert mean == 1.0 and math.isnan(per_label[1])


def test_probe_learns_a_linearly_separable_label():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 10, generator=generator)
    labels = torch.stack([(features[:, 0] > 0), (features[:, 1] + features[:, 2] > 0)], 1).float()
    train, test = standardise(features[:150], features[150:])
    probe = train_linear_probe(train, labels[:150], epochs=200, lr=0.05)
    mean, _ = macro_auroc(probe(test).detach(), labels[150:])
    assert mean > 0.95


def probe_case(seed=0):
    """Train and test features on different scales and offsets, so statistics pooled over
    the two differ clearly from the training subset's."""
    generator = torch.Generator().manual_seed(seed)
    train = torch.randn(40, 6, generator=generator) * torch.arange(1.0, 7.0) + 3.0
    test = torch.randn(10, 6, generator=generator) * 5.0 - 4.0
    labels = (train[:, :2] > 3.0).float()
    return train, test, labels


def test_every_split_is_scaled_with_the_training_subsets_statistics_alone():
    train, test, _ = probe_case()
    mean = train.numpy().mean(0)
    std = train.numpy().std(0, ddof=1)
    scaled_train, scaled_test = standardise(train, test)
    np.testing.assert_allclose(
        scaled_test.numpy(), (test.numpy() - mean) / std, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        scaled_train.numpy(), (train.numpy() - mean) / std, rtol=1e-5, atol=1e-5
    )


def test_test_predictions_do_not_move_when_the_test_set_changes():
    train, test, labels = probe_case()
    extreme = torch.full((3, 6), 1.0e4)  # rows that would dominate pooled statistics
    scaled_train, scaled_test = standardise(train, test)
    again_train, scaled_longer = standardise(train, torch.cat([test, extreme]))
    assert torch.equal(scaled_train, again_train)
    probe = train_linear_probe(scaled_train, labels, epochs=20)
    with torch.no_grad():
        alone, with_extremes = probe(scaled_test), probe(scaled_longer)
    assert torch.allclose(with_extremes[: len(test)], alone, rtol=0, atol=1e-6)


def test_no_label_with_both_classes_gives_nan_not_an_error():
    labels = torch.ones(4, 2)
    mean, per_label = macro_auroc(torch.randn(4, 2), labels)
    assert math.isnan(mean) and all(math.isnan(v) for v in per_label)


def test_the_probe_starts_from_its_seeds_small_normal_weights_and_zero_bias():
    """epochs=0 returns the initial probe: N(0, 0.01) weights drawn from ``seed``'s own
    generator (not the global one), so a cell's seed alone fixes its probe."""
    features, labels = torch.randn(8, 4), torch.zeros(8, 3)
    torch.manual_seed(123)
    first = train_linear_probe(features, labels, epochs=0, seed=5)
    torch.manual_seed(456)
    again = train_linear_probe(features, labels, epochs=0, seed=5)
    expected = torch.empty(3, 4).normal_(0, 0.01, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first.weight, expected)
    torch.testing.assert_close(again.weight, expected)
    assert torch.count_nonzero(first.bias) == 0
    other = train_linear_probe(features, labels, epochs=0, seed=6)
    assert not torch.equal(other.weight, first.weight)
    assert train_linear_probe(features, labels, epochs=0).weight.equal(
        train_linear_probe(features, labels, epochs=0, seed=0).weight
    )


def test_the_probe_defaults_and_its_weight_decay_are_the_ones_it_trains_with():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(40, 6, generator=generator)
    labels = (torch.rand(40, 2, generator=generator) > 0.5).float()
    default = train_linear_probe(features, labels)
    explicit = train_linear_probe(features, labels, epochs=200, lr=1e-2, weight_decay=1e-4)
    assert torch.equal(default.weight, explicit.weight)
    heavy = train_linear_probe(features, labels, weight_decay=0.5)
    assert heavy.weight.norm() < default.weight.norm() - 1e-3


def test_the_probe_trains_on_its_features_device():
    """On the meta device a probe left on the CPU meets the features and torch refuses."""
    features, labels = torch.randn(8, 4, device="meta"), torch.rand(8, 3, device="meta")
    probe = train_linear_probe(features, labels, epochs=2)
    assert probe.weight.device.type == "meta"
