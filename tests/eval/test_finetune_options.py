"""Fine-tuning options: the encoder's learning-rate multiplier and the class-balanced loss."""

from __future__ import annotations

import torch

from densessl.data.labeled.build import build_eval_dataset
from densessl.eval.finetune import param_groups, train_dense
from densessl.eval.segmentation import build_segmentation_model


def test_param_groups_split_encoder_and_heads():
    model = build_segmentation_model("fpn", "resnet18", 3, 5)
    groups = param_groups(model, [model.encoder], lr=1e-3, mult=0.1)
    assert [g["lr"] for g in groups] == [1e-4, 1e-3]
    enc = {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[0]["params"]} == enc
    rest = {id(p) for p in model.parameters()} - enc
    assert {id(p) for p in groups[1]["params"]} == rest


def test_zero_encoder_lr_keeps_the_encoder_and_trains_the_head():
    data = build_eval_dataset("synthetic", {"num_train": 8, "num_val": 2, "num_source": 0},
                              image_size=32)
    torch.manual_seed(0)
    model = build_segmentation_model("fpn", "resnet18", 3, 5)
    enc0 = {k: v.clone() for k, v in model.encoder.named_parameters()}
    head0 = {k: v.clone() for k, v in model.segmentation_head.named_parameters()}
    weights = torch.tensor([0.5, 2.0, 2.0, 2.0, 2.0])
    train_dense(model, data.train, steps=3, batch_size=4, lr=1e-2, weight_decay=1e-4, seed=0,
                mean=[0.5] * 3, std=[0.25] * 3, slow=[model.encoder], encoder_lr_mult=0.0,
                class_weights=weights)
    assert all(torch.equal(enc0[k], v) for k, v in model.encoder.named_parameters())
    assert any(not torch.equal(head0[k], v)
               for k, v in model.segmentation_head.named_parameters())
