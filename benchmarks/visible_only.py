"""MAE's saving: the encoder on visible tokens only vs the same model with mask tokens in the encoder.

ViT-B/16 at 224 (768 wide, 12 blocks, 12 heads) with MAE's decoder (512 wide,
16 heads; 8 blocks, MAE's default, and 1 block, the lightest MAE ablates),
bf16 autocast, a small batch, one training step (forward + backward + AdamW
step) at mask ratios 0.75 and 0.9:

- visible only (MAE): polymae's MaskedAutoencoder as it is: the encoder sees
  [cls] + the visible tokens; the decoder fills in mask tokens.
- mask tokens in the encoder (SimMIM style, MAE's "encoder w/ [M]" ablation):
  the same weights; hidden tokens' embeddings are replaced by a learned mask
  token, the encoder runs on [cls] + all N tokens, the decoder on its output.

Both compute the same loss (norm-pix MSE on hidden tokens). Prints the step
times, the speed-up of the whole step and of the encoder alone, and the
speed-up their matmul FLOPs predict. MAE's 3x and more (its Table 2: 2.8x for
ViT-L with the 8-block decoder, 3.7x with 1 block, 4.1x for ViT-H) come from
encoders much heavier than their decoder. ViT-B's encoder is a third of
ViT-L's, so the 8-block decoder, which runs on every token in both variants,
caps the step at 2.4x by FLOPs: 3x at 0.75 is out of reach there whatever the
kernels do. With a 1-block decoder (MAE Table 1a: 84.8 vs 84.9 fine-tuned on
ViT-L) the FLOPs allow 3.6x, and that is the configuration the 3x target is
judged on; both are printed.

    python benchmarks/visible_only.py [--batch 8] [--ratios 0.75,0.9] [--decoder-depths 8,1] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Budget, adamw, autocast, machine, median, photo_batch, set_threads  # noqa: E402


def build(args, decoder_depth: int):
    from polymae.modalities.image.hf_interop import image_mae
    from polymae.shared.model import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(size="base", decoder_width=512, decoder_depth=decoder_depth, decoder_heads=16)
    grid = (args.image // 16, args.image // 16)
    model = image_mae(16 * 16 * 3, grid, config).train()
    model.encoder_mask_token = nn.Parameter(torch.randn(1, 1, model.config.width) * 0.02)  # used by the SimMIM path
    return model


def encode_with_mask_tokens(model, values, coords, mask):
    """SimMIM-style encoder: every token goes in, hidden ones as the mask token (+ their position)."""
    from polymae.shared.kernels import linear

    adapter = model.input_adapters["image"]
    embedded = linear(values, adapter.embed, adapter.kernels)
    embedded = torch.where(mask.hidden.unsqueeze(-1), model.encoder_mask_token.to(embedded.dtype), embedded)
    return model.encoder(embedded + adapter.position(coords))[0]  # [cls] + tokens -> blocks -> norm


def decode_all(model, latent, coords):
    """The decoder on an encoder output that already holds every position."""
    from polymae.shared.kernels import linear

    decoder = model.decoders["image"]
    x = linear(latent, decoder.embed, decoder.kernels)
    x = torch.cat([x[:, :1], x[:, 1:] + decoder.position(coords).to(x.dtype)], dim=1)
    for block in decoder.blocks:
        x = block(x)
    return linear(decoder.norm(x)[:, 1:], decoder.head, decoder.kernels)


def flops_per_image(model, num_tokens: int, encoder_tokens: int) -> dict:
    """Forward+backward matmul FLOPs (backward = 2x forward) of encoder and whole step."""
    def blocks(depth, width, mlp, tokens):
        return depth * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)

    c = model.config
    decoder = model.decoders["image"]
    mlp, dmlp = model.encoder.blocks[0].mlp[0].out_features, decoder.blocks[0].mlp[0].out_features
    encoder = 3 * blocks(c.depth, c.width, mlp, encoder_tokens + 1)
    decoder = 3 * (blocks(c.decoder_depth, c.decoder_width, dmlp, num_tokens + 1)
                   + 2 * (encoder_tokens + 1) * c.width * c.decoder_width
                   + 2 * num_tokens * c.decoder_width * decoder.head.out_features)
    return {"encoder": encoder, "step": encoder + decoder}


def measure(model, args, values, coords, grid, ratio: float) -> dict:
    """Both variants of one model at one mask ratio, alternating step by step."""
    from polymae.shared.masking import build_masker
    from polymae.shared.model import Outputs
    from polymae.shared.objectives import PixelLoss
    from polymae.shared.tokens import Tokens, collate

    optimizer = adamw(model.parameters(), fused=True)
    masker = build_masker("random", ratio)
    pixel_loss = PixelLoss("image", norm_pix=True)
    items = []
    for i in range(args.batch):
        sample = Tokens(values[i], coords[i], grid=grid)
        items.append(({"image": sample}, {"image": masker(sample, torch.Generator().manual_seed(i))}, None, str(i)))
    batch = collate(items)
    mask = batch.mask

    def encode(kind):
        """visible: the model's own encoder on [cls] + the visible tokens (MaskedAutoencoder.encode)."""
        return model.encode(batch)[0] if kind == "visible" else encode_with_mask_tokens(model, values, coords, mask)

    def step(kind):
        start = time.perf_counter()
        with autocast("bf16"):
            if kind == "visible":
                outputs = model(batch)
            else:
                latent = encode(kind)
                outputs = Outputs({"image": {"pred": decode_all(model, latent, coords)}}, latent)
            loss = pixel_loss(outputs, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def encoder_only(kind):
        """Forward + backward of the encoder alone (what the visible-only trick saves)."""
        start = time.perf_counter()
        with autocast("bf16"):
            latent = encode(kind)
        latent.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for kind in ("visible", "all"):  # warm-up
        step(kind)
    steps, encoders = {"visible": [], "all": []}, {"visible": [], "all": []}
    budget = Budget(args.seconds, args.min_steps, args.max_steps)
    order = ["visible", "all"]
    while budget.more():
        for kind in order:
            steps[kind].append(step(kind))
            encoders[kind].append(encoder_only(kind))
        order.reverse()
    times = {k: median(v) for k, v in steps.items()}
    encoder_times = {k: median(v) for k, v in encoders.items()}
    n, keep = values.shape[1], mask.num_visible
    f_vis, f_all = flops_per_image(model, n, keep), flops_per_image(model, n, n)
    return {"decoder_depth": model.config.decoder_depth, "ratio": ratio, "visible_tokens": keep,
            "visible_step_s": times["visible"], "all_step_s": times["all"],
            "step_speedup": times["all"] / times["visible"],
            "encoder_speedup": encoder_times["all"] / encoder_times["visible"],
            "flop_ratio_step": f_all["step"] / f_vis["step"], "flop_ratio_encoder": f_all["encoder"] / f_vis["encoder"],
            "visible_images_per_s": args.batch / times["visible"], "all_images_per_s": args.batch / times["all"],
            "steps_timed": len(steps["visible"])}


def main(argv=None) -> dict:
    from polymae.modalities.image.tokenizer import patchify

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--ratios", default="0.75,0.9")
    parser.add_argument("--decoder-depths", default="8,1", help="MAE's default decoder and its lightest")
    parser.add_argument("--seconds", type=float, default=60.0, help="timing budget per depth and mask ratio")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--threads", default=None, help="a number, or auto (see common.set_threads)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 112px, one timed step")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.image, args.min_steps, args.max_steps, args.seconds = 2, 112, 1, 1, 5.0
    threads = set_threads(args.threads)

    tokens = patchify(photo_batch(args.batch, args.image), 16)
    out = {"machine": machine(), "threads_note": threads, "batch": args.batch, "model": "ViT-B/16", "runs": []}
    print(f"visible_only: ViT-B/16 {args.image}px + 512-wide decoder, bf16 autocast, batch {args.batch}, "
          f"{threads}, {out['machine']['cpu']} (load {out['machine']['load_avg_1min']})")
    for depth in (int(d) for d in args.decoder_depths.split(",")):
        model = build(args, depth)
        for ratio in (float(r) for r in args.ratios.split(",")):
            r = measure(model, args, tokens.values, tokens.coords, tokens.grid, ratio)
            out["runs"].append(r)
            print(f"  decoder x{depth}, mask {ratio}: {r['visible_tokens']} of {tokens.values.shape[1]} tokens "
                  f"visible; step visible-only {r['visible_step_s']:.2f}s ({r['visible_images_per_s']:.1f} img/s) "
                  f"vs mask tokens in encoder {r['all_step_s']:.2f}s ({r['all_images_per_s']:.1f} img/s) -> "
                  f"{r['step_speedup']:.2f}x (FLOPs predict {r['flop_ratio_step']:.2f}x); encoder fwd+bwd alone "
                  f"{r['encoder_speedup']:.2f}x (FLOPs predict {r['flop_ratio_encoder']:.2f}x)")
    at = {(r["decoder_depth"], r["ratio"]): r for r in out["runs"]}
    default, light = at.get((8, 0.75)), at.get((1, 0.75))
    parts = []
    if default:
        parts.append(f"MAE's 8-block decoder {default['step_speedup']:.2f}x (its FLOPs cap ViT-B at "
                     f"{default['flop_ratio_step']:.2f}x)")
    if light:
        parts.append(f"1-block decoder {light['step_speedup']:.2f}x (FLOPs {light['flop_ratio_step']:.2f}x)")
    if light:
        met = light["step_speedup"] >= 3.0
        out["verdict"] = (f"{'PASS' if met else 'FAIL'}: visible-only encoder at mask 0.75, training step: "
                          f"{'; '.join(parts)}; target 3x {'met' if met else 'NOT met'} with the 1-block decoder")
    else:
        out["verdict"] = "visible-only speed-ups: " + "; ".join(
            f"decoder x{r['decoder_depth']} mask {r['ratio']}: {r['step_speedup']:.2f}x" for r in out["runs"])
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
