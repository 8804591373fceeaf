import math

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
