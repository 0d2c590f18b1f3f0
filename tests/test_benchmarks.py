"""The end-to-end benchmark's pieces: the generated data set, the augmentation, a tiny run."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import e2e_train  # noqa: E402


def test_synthetic_data_is_deterministic_balanced_and_held_out_has_both_classes():
    data = e2e_train.SyntheticTwoClass(40, 20)
    a, la = data.item(7)
    b, lb = data.item(7)
    assert torch.equal(a, b) and la == lb == 1 and a.shape == (3, 20, 20)
    assert 0 <= a.min() and a.max() <= 1
    labels = [data.item(i)[1] for i in range(40)]
    assert labels.count(0) == labels.count(1) == 20


def test_random_resized_crop_flip_shape_and_determinism():
    img = torch.rand(3, 30, 40)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c1, c2 = e2e_train.random_resized_crop_flip(img, 16, g1), e2e_train.random_resized_crop_flip(img, 16, g2)
    assert c1.shape == (3, 16, 16) and torch.equal(c1, c2)


def test_tiny_end_to_end_run_writes_predictions(tmp_path):
    args = e2e_train.parser(False).parse_args(["--arch", "resnet18", "--steps", "3", "--batch", "4", "--size", "32",
                                               "--images", "20", "--out", str(tmp_path)])
    result = e2e_train.run(args, torch.device("cpu"))
    assert result["fused_blocks"] == 8
    assert len(result["stock"]["losses"]) == len(result["fusedres"]["losses"]) == 3
    assert abs(result["stock"]["losses"][0] - result["fusedres"]["losses"][0]) < 1e-4, "same weights, same batch"
    lines = open(result["predictions_csv"]).read().splitlines()
    assert lines[0] == "id,p_dog" and len(lines) == 1 + result["held_out"]
