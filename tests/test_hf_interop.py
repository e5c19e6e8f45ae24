"""Hugging Face ViTMAE <-> polymae: the same network, weights and loss, both ways.

HF models are built from small ViTMAEConfigs with random weights (nothing is
downloaded) and fed a real photo (scikit-image's astronaut).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")

from polymae.modalities.image.tokenizer import grid_coords, patchify  # noqa: E402
from polymae.modalities.image.hf_interop import (fill_hf_sincos_tables, from_hf_vitmae,  # noqa: E402
                                                 hf_config_for, hf_noise_to_mask, image_mae,
                                                 model_kwargs_from_hf, to_hf_vitmae)
from polymae.shared.model import (DecoderConfig, InputAdapter, MaskedAutoencoder, ModelConfig,  # noqa: E402
                                  TransformerDecoder, ViTEncoder)
from polymae.shared.objectives import LossTerms, PixelLoss  # noqa: E402
from polymae.shared.position import LearnedPosition, SinCosPosition  # noqa: E402
from polymae.shared.tokens import Mask, collate  # noqa: E402

IMAGE, PATCH, RATIO = 32, 8, 0.75
N = (IMAGE // PATCH) ** 2


def hf_config(norm_pix: bool, **overrides):
    return transformers.ViTMAEConfig(**{
        "image_size": IMAGE, "patch_size": PATCH, "num_channels": 3, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128, "decoder_hidden_size": 32,
        "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 4, "decoder_intermediate_size": 64,
        "mask_ratio": RATIO, "norm_pix_loss": norm_pix, "attn_implementation": "sdpa", **overrides})


def hf_own_sincos_init(model) -> None:
    """Run HF's own table initialisers: in transformers 5.x a model built from a config keeps all-zero
    position tables (post-init flags the patch projection as initialised before the embeddings module
    fills its table, then zeroes the decoder's)."""
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)


def hf_model(norm_pix: bool = True, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = transformers.ViTMAEForPreTraining(hf_config(norm_pix, **overrides)).eval()
    hf_own_sincos_init(model)
    with torch.no_grad():  # HF initialises biases, norms and the mask token to constants: make them random too
        for name, param in model.named_parameters():
            if param.ndim == 1 or name.endswith("_token"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def pixels():
    """Two 32x32 crops of the astronaut photo, ImageNet-normalised: [2, 3, 32, 32]."""
    photo = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 255  # [3, 512, 512]
    crops = torch.stack([photo[:, 0:256, 128:384], photo[:, 200:456, 100:356]])          # face, suit
    small = F.interpolate(crops, size=(IMAGE, IMAGE), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (small - mean) / std


@pytest.fixture(scope="module")
def noise():
    return torch.rand(2, N, generator=torch.Generator().manual_seed(7))


def polymae_batch(pixels, noise):
    items = []
    for i in range(pixels.shape[0]):
        tokens = patchify(pixels[i], PATCH)
        mask = Mask.from_scores(noise[i], round(RATIO * N))
        items.append(({"image": tokens}, {"image": mask}, None, f"astronaut-{i}"))
    return collate(items)


def run_polymae(model, batch, norm_pix):
    out = model(batch)
    loss, _ = LossTerms({"pixel": {"weight": 1.0, "norm_pix": norm_pix}}, ["image"])(out, batch)
    return loss, out


# -- the same network ---------------------------------------------------------------

@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_same_loss_and_reconstruction(pixels, noise, norm_pix, kernels):
    hf = hf_model(norm_pix)
    model = from_hf_vitmae(hf, kernels=kernels).eval()
    batch = polymae_batch(pixels, noise)
    with torch.no_grad():
        hf_out = hf(pixel_values=pixels, noise=noise)
        loss, out = run_polymae(model, batch, norm_pix)
    # HF keeps the lowest-noise patches, as Mask.from_scores hides the highest scores
    assert torch.equal(hf_out.mask.bool(), batch.mask.hidden)
    assert torch.equal(hf_out.ids_restore, batch.mask.ids_restore)
    assert torch.equal(hf.patchify(pixels), batch.tokens.values)  # same token layout and target
    torch.testing.assert_close(out.pred("image"), hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(PixelLoss("image", norm_pix=norm_pix)(out, batch), hf_out.loss, atol=1e-5, rtol=1e-5)


def test_same_gradients(pixels, noise):
    """One backward pass: polymae's gradients, exported with the weights' own mapping, are HF's."""
    hf = hf_model(True).train()
    model = from_hf_vitmae(hf).train()
    batch = polymae_batch(pixels, noise)
    hf(pixel_values=pixels, noise=noise).loss.backward()
    run_polymae(model, batch, True)[0].backward()
    grads = image_mae(**model_kwargs_from_hf(hf.config))
    with torch.no_grad():
        for (name, param), (_, grad_holder) in zip(model.named_parameters(), grads.named_parameters()):
            grad_holder.copy_(param.grad)
    exported = to_hf_vitmae(grads)
    hf_grads = {name: p.grad for name, p in hf.named_parameters() if p.grad is not None}
    assert set(hf_grads) <= set(exported)
    for name, grad in hf_grads.items():
        torch.testing.assert_close(exported[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_losses_agree(pixels, noise):
    hf = hf_model(True)
    model = from_hf_vitmae(hf).eval()
    batch = polymae_batch(pixels, noise)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hf_loss = hf(pixel_values=pixels, noise=noise).loss
        loss, out = run_polymae(model, batch, True)
    assert out.pred("image").dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), hf_loss.float(), atol=0, rtol=2e-2)


def test_layer_norm_eps_and_architecture_come_from_the_config():
    kwargs = model_kwargs_from_hf(hf_config(True, layer_norm_eps=1e-9))
    cfg = kwargs["config"]
    assert (kwargs["d_in"], kwargs["grid"]) == (PATCH * PATCH * 3, (4, 4))
    assert (cfg.width, cfg.depth, cfg.heads, cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads) == (
        64, 2, 4, 32, 1, 4)
    assert cfg.layer_norm_eps == 1e-9 and cfg.cls_token and cfg.position == "sincos"
    model = from_hf_vitmae(hf_model(True, layer_norm_eps=1e-9))
    assert model.encoder.blocks[0].norm1.eps == 1e-9 and model.decoders["image"].blocks[0].mlp[0].out_features == 64


def test_masking_noise_matches_hf_for_other_ratios():
    """HF keeps int(N * (1 - ratio)) patches; `hf_noise_to_mask` makes that mask for any ratio."""
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(0))
    for ratio in (0.75, 0.9, 0.6):
        hf = transformers.ViTMAEForPreTraining(hf_config(True, mask_ratio=ratio))
        _, hf_mask, hf_restore = hf.vit.embeddings.random_masking(torch.zeros(3, 196, 4), noise)
        mask = hf_noise_to_mask(noise, ratio)
        assert torch.equal(hf_mask.bool(), mask.hidden) and torch.equal(hf_restore, mask.ids_restore)


# -- positions ------------------------------------------------------------------------

def test_hf_sincos_tables_are_polymae_sincos_on_col_row_coords():
    for hidden, decoder, image in [(64, 32, 32), (384, 256, 224), (768, 512, 224)]:
        hf = transformers.ViTMAEForPreTraining(hf_config(True, hidden_size=hidden, decoder_hidden_size=decoder,
                                                         image_size=image, patch_size=16 if image > 32 else 8))
        hf_own_sincos_init(hf)
        side = image // (16 if image > 32 else 8)
        coords = grid_coords(side, side)  # (x, y) = (col, row), row-major
        enc = hf.vit.embeddings.position_embeddings[0]
        dec = hf.decoder.decoder_pos_embed[0]
        assert torch.equal(enc[0], torch.zeros(hidden)) and torch.equal(dec[0], torch.zeros(decoder))
        torch.testing.assert_close(enc[1:], SinCosPosition(hidden, 2)(coords), atol=1e-6, rtol=0)
        torch.testing.assert_close(dec[1:], SinCosPosition(decoder, 2)(coords), atol=1e-6, rtol=0)
        fresh = transformers.ViTMAEForPreTraining(hf.config)
        fill_hf_sincos_tables(fresh)  # polymae's tables written into HF: HF's exactly
        assert torch.equal(fresh.vit.embeddings.position_embeddings, hf.vit.embeddings.position_embeddings)
        assert torch.equal(fresh.decoder.decoder_pos_embed, hf.decoder.decoder_pos_embed)


def test_a_non_sincos_table_imports_as_a_learned_one(pixels, noise):
    hf = hf_model(True)
    with torch.no_grad():
        hf.vit.embeddings.position_embeddings[0, 1:] += torch.randn(N, 64) * 0.05
    model = from_hf_vitmae(hf).eval()
    assert isinstance(model.input_adapters["image"].position, LearnedPosition)
    assert isinstance(model.decoders["image"].position, SinCosPosition)
    batch = polymae_batch(pixels, noise)
    with torch.no_grad():
        hf_out = hf(pixel_values=pixels, noise=noise)
        loss, out = run_polymae(model, batch, True)
    torch.testing.assert_close(out.pred("image"), hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-5, rtol=1e-5)


# -- export -----------------------------------------------------------------------------

def polymae_model(seed: int = 0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(width=64, depth=2, heads=4, decoder_width=32, decoder_depth=1, decoder_heads=4)
    model = image_mae(PATCH * PATCH * 3, (4, 4), cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def test_round_trip_polymae_hf_polymae_is_exact():
    model = polymae_model()
    config = hf_config_for(model, mask_ratio=RATIO, norm_pix_loss=True)
    hf = transformers.ViTMAEForPreTraining(config)
    missing, unexpected = hf.load_state_dict(to_hf_vitmae(model), strict=True)
    assert not missing and not unexpected
    back = from_hf_vitmae(hf)
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_round_trip_hf_polymae_hf_is_exact():
    hf = hf_model(False, seed=3)
    exported = to_hf_vitmae(from_hf_vitmae(hf))
    original = hf.state_dict()
    assert exported.keys() == original.keys()
    for key in original:
        assert torch.equal(exported[key], original[key]), key


def test_exported_model_reproduces_polymae_in_hf(pixels, noise):
    model = polymae_model(seed=1).eval()
    hf = transformers.ViTMAEForPreTraining(hf_config_for(model, mask_ratio=RATIO, norm_pix_loss=True,
                                                         attn_implementation="sdpa")).eval()
    hf.load_state_dict(to_hf_vitmae(model))
    batch = polymae_batch(pixels, noise)
    with torch.no_grad():
        loss, out = run_polymae(model, batch, True)
        hf_out = hf(pixel_values=pixels, noise=noise)
    torch.testing.assert_close(hf_out.logits, out.pred("image"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_out.loss, loss, atol=1e-5, rtol=1e-5)


def test_encoder_export_loads_into_vitmae_model(pixels, noise):
    model = polymae_model(seed=2).eval()
    encoder = transformers.ViTMAEModel(hf_config_for(model, mask_ratio=RATIO)).eval()
    missing, unexpected = encoder.load_state_dict(to_hf_vitmae(model, encoder_only=True), strict=True)
    assert not missing and not unexpected
    batch = polymae_batch(pixels, noise)
    with torch.no_grad():
        latent = run_polymae(model, batch, True)[1].latent
        hf_latent = encoder(pixel_values=pixels, noise=noise).last_hidden_state
    torch.testing.assert_close(hf_latent, latent, atol=1e-5, rtol=1e-5)
    # and a ViTMAEModel's own state dict imports back into polymae's encoder
    again = from_hf_vitmae(encoder.state_dict(), encoder.config)
    for key, value in model.state_dict().items():
        if not key.startswith("decoders."):
            assert torch.equal(again.state_dict()[key], value), key


def test_export_refuses_what_hf_cannot_hold():
    no_cls = image_mae(192, (4, 4), ModelConfig(width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1,
                                                decoder_heads=2, cls_token=False))
    with pytest.raises(ValueError, match="cls token"):
        to_hf_vitmae(no_cls)
    cfg = ModelConfig(width=32, depth=1, heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2).resolved()
    no_grid = MaskedAutoencoder({"image": InputAdapter(192, 32, 2)}, ViTEncoder(cfg),   # tokens off any grid
                                {"image": TransformerDecoder(32, 192, 2, cfg, DecoderConfig())}, cfg)
    with pytest.raises(ValueError, match="grid"):
        to_hf_vitmae(no_grid)
    with pytest.raises(ValueError, match="hidden_act"):
        model_kwargs_from_hf(hf_config(True, hidden_act="relu"))


# -- checkpoint folders: a recipe starts from local HF weights; a run exports to one -------------------

def image_recipe(tmp_path, *overrides):
    """The default recipe turned into a 32px RGB image MAE shaped like `hf_config`."""
    from polymae.shared.config import load_config

    return load_config(None, ["modality_options.image_size=[32,32]", "modality_options.patch_size=8",
                              "modality_options.channels=3", "model.width=64", "model.depth=2", "model.heads=4",
                              "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=4",
                              "model.mlp_ratio=2.0", "model.decoder_mlp_ratio=2.0", "model.layer_norm_eps=1e-12",
                              f"out_dir={tmp_path}", *overrides])


def test_a_recipe_starts_from_a_local_hf_folder(tmp_path, pixels, noise):
    from polymae.pipelines.runs import build_parts
    from polymae.shared.errors import ConfigError

    hf = hf_model(True, seed=5)
    hf.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors, as a downloaded checkpoint has
    parts = build_parts(image_recipe(tmp_path, f"model.init_from={tmp_path / 'hf'}"))
    batch = polymae_batch(pixels, noise)
    with torch.no_grad():
        loss, out = run_polymae(parts.model.eval(), batch, True)
        hf_out = hf(pixel_values=pixels, noise=noise)
    torch.testing.assert_close(out.pred("image"), hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-5, rtol=1e-5)
    # a recipe that does not describe the checkpoint says which settings would
    with pytest.raises(ConfigError, match=r"model.depth=2.*model.decoder_width=32"):
        build_parts(image_recipe(tmp_path, "model.depth=3", "model.decoder_width=48",
                                 f"model.init_from={tmp_path / 'hf'}"))
    with pytest.raises(ConfigError, match="neither a Hugging Face folder"):
        build_parts(image_recipe(tmp_path, f"model.init_from={tmp_path / 'nothing'}"))


def test_a_run_exports_to_a_folder_hf_loads_and_starts_another_run(tmp_path, digits_shards):
    """`polymae export` of a real (short) digits run: ViTMAEForPreTraining.from_pretrained gives the
    run's loss and reconstruction on held-out digits, ViTMAEModel its encoding, and the folder (or
    the run itself) starts a new recipe with exactly the run's weights."""
    from polymae.pipelines.cli import main
    from polymae.pipelines.pretrain import pretrain
    from polymae.pipelines.runs import build_parts, load_run
    from polymae.pipelines.stream import Loader, ShardStream
    from polymae.shared.config import load_config
    from polymae.shared.masking import build_masker

    recipe = [f"data.shards={digits_shards}", "data.source=null", f"out_dir={tmp_path}", "trainer.max_steps=5",
              "data.num_workers=0", "probe.enabled=false", "model.depth=2", "model.layer_norm_eps=1e-12",
              "mask.ratio=0.75"]  # the exported config's mask_ratio is what HF masks the noise below with
    pretrain(load_config(None, recipe))
    run_dir = tmp_path / "digits_mae"
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "hf-encoder"), "--encoder-only"]) == 0

    parts, _ = load_run(run_dir)
    model = parts.model.eval()
    stream = ShardStream([str(p) for p in sorted(digits_shards.glob("val-*.tar"))],
                         [parts.streams[0]._replace(masker=build_masker("random", 0.75))], batch_size=16, train=False)
    batch = next(iter(Loader(stream, 0)))
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    encoder = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf-encoder").eval()
    hf_pixels = hf.unpatchify(batch.tokens.values, (8, 8))  # the loader's normalised patches, as HF's images
    scores = torch.rand(len(batch), 16, generator=torch.Generator().manual_seed(3))
    mask = hf_noise_to_mask(scores, 0.75)
    with torch.no_grad():
        rescored = dataclasses.replace(batch, mask=mask)
        out = model(rescored)
        loss, _ = parts.module.objective(out, rescored)
        hf_out = hf(pixel_values=hf_pixels, noise=scores)
        hf_latent = encoder(pixel_values=hf_pixels, noise=scores).last_hidden_state
    torch.testing.assert_close(hf_out.logits, out.pred("image"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_out.loss, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_latent, out.latent, atol=1e-5, rtol=1e-5)

    for source in (tmp_path / "hf", run_dir, tmp_path / "hf-encoder"):
        started = build_parts(load_config(None, recipe + [f"model.init_from={source}"])).model
        for key, value in model.state_dict().items():
            if source.name == "hf-encoder" and key.startswith("decoders."):
                continue  # an encoder checkpoint leaves the decoder at its fresh initialisation
            assert torch.equal(started.state_dict()[key], value), (source, key)
