"""MAE's saving: the encoder on visible tokens only vs the same model with mask tokens in the encoder.

ViT-B/16 at 224 (768 wide, 12 blocks, 12 heads) with MAE's decoder (512 wide,
8 blocks, 16 heads), bf16 autocast, a small batch, one training step
(forward + backward + AdamW step) at mask ratios 0.75 and 0.9:

- visible only (MAE): polymae's MaskedAutoencoder as it is: the encoder sees
  [cls] + the visible tokens; the decoder fills in mask tokens.
- mask tokens in the encoder (SimMIM style, MAE's "encoder w/ [M]" ablation):
  the same weights; hidden tokens' embeddings are replaced by a learned mask
  token, the encoder runs on [cls] + all N tokens, the decoder on its output.

Both compute the same loss (norm-pix MSE on hidden tokens). Prints the step
times, the speed-up of the whole step and of the encoder alone, and the
speed-up their matmul FLOPs predict. MAE reports about 3x for the whole step
(ViT-L, 8-block decoder); with ViT-B's lighter encoder the same decoder is a
bigger share, which caps the step's speed-up lower (the FLOP ratio says how much).

    python benchmarks/visible_only.py [--batch 8] [--ratios 0.75,0.9] [--quick]
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


def build(args):
    from polymae.shared.model import MaskedAutoencoder, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(size="base", decoder_width=512, decoder_depth=args.decoder_depth, decoder_heads=16)
    grid = (args.image // 16, args.image // 16)
    model = MaskedAutoencoder(16 * 16 * 3, 2, config, grid=grid).train()
    model.encoder_mask_token = nn.Parameter(torch.randn(1, 1, model.config.width) * 0.02)  # used by the SimMIM path
    return model


def encode_with_mask_tokens(model, values, coords, mask):
    """SimMIM-style encoder: every token goes in, hidden ones as the mask token (+ their position)."""
    from polymae.shared.kernels import linear

    adapter = model.input_adapter
    embedded = linear(values, adapter.embed, adapter.kernels)
    embedded = torch.where(mask.hidden.unsqueeze(-1), model.encoder_mask_token.to(embedded.dtype), embedded)
    x = embedded + adapter.position(coords)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def decode_all(model, latent, coords):
    """The decoder on an encoder output that already holds every position."""
    from polymae.shared.kernels import linear

    x = linear(latent, model.decoder_embed, model.config.kernels)
    x = torch.cat([x[:, :1], x[:, 1:] + model.decoder_position(coords).to(x.dtype)], dim=1)
    for block in model.decoder_blocks:
        x = block(x)
    return linear(model.decoder_norm(x)[:, 1:], model.head, model.config.kernels)


def flops_per_image(model, num_tokens: int, encoder_tokens: int) -> dict:
    """Forward+backward matmul FLOPs (backward = 2x forward) of encoder and whole step."""
    def blocks(depth, width, mlp, tokens):
        return depth * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)

    c = model.config
    mlp, dmlp = model.blocks[0].mlp[0].out_features, model.decoder_blocks[0].mlp[0].out_features
    encoder = 3 * blocks(c.depth, c.width, mlp, encoder_tokens + 1)
    decoder = 3 * (blocks(c.decoder_depth, c.decoder_width, dmlp, num_tokens + 1)
                   + 2 * (encoder_tokens + 1) * c.width * c.decoder_width
                   + 2 * num_tokens * c.decoder_width * model.d_in)
    return {"encoder": encoder, "step": encoder + decoder}


def main(argv=None) -> dict:
    from polymae.modalities.image.tokenizer import patchify
    from polymae.shared.masking import build_masker
    from polymae.shared.model import gather_tokens
    from polymae.shared.objectives import pixel_loss
    from polymae.shared.tokens import Tokens, collate

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--ratios", default="0.75,0.9")
    parser.add_argument("--decoder-depth", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="timing budget per mask ratio")
    parser.add_argument("--min-steps", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--threads", default=None, help="a number, or auto (see common.set_threads)")
    parser.add_argument("--quick", action="store_true", help="batch 2, 112px, one timed step")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.image, args.min_steps, args.max_steps, args.seconds = 2, 112, 1, 1, 5.0
    threads = set_threads(args.threads)

    model = build(args)
    optimizer = adamw(model.parameters(), fused=True)
    tokens = patchify(photo_batch(args.batch, args.image), 16)
    values, coords = tokens.values, tokens.coords
    n = values.shape[1]
    out = {"machine": machine(), "threads_note": threads, "batch": args.batch, "model": "ViT-B/16",
           "decoder_depth": args.decoder_depth}
    print(f"visible_only: ViT-B/16 {args.image}px + decoder 512x{args.decoder_depth}, bf16 autocast, batch "
          f"{args.batch}, {threads}, {out['machine']['cpu']} "
          f"(load {out['machine']['load_avg_1min']})")

    def visible(mask):
        """The visible tokens' values and coords, as MaskedAutoencoder.forward gathers them."""
        return gather_tokens(values, mask.ids_keep), gather_tokens(coords, mask.ids_keep)

    def step(kind, batch, mask):
        start = time.perf_counter()
        with autocast("bf16"):
            t0 = time.perf_counter()
            if kind == "visible":
                latent = model.encode(*visible(mask))
                t1 = time.perf_counter()
                pred = model.decode(latent, mask, coords)
            else:
                latent = encode_with_mask_tokens(model, values, coords, mask)
                t1 = time.perf_counter()
                pred = decode_all(model, latent, coords)
            loss = pixel_loss({"pred": pred}, batch, norm_pix=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"step_s": time.perf_counter() - start, "encoder_forward_s": t1 - t0, "loss": loss.item()}

    def encoder_only(kind, mask):
        """Forward + backward of the encoder alone (what the visible-only trick saves)."""
        start = time.perf_counter()
        with autocast("bf16"):
            if kind == "visible":
                latent = model.encode(*visible(mask))
            else:
                latent = encode_with_mask_tokens(model, values, coords, mask)
        latent.float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for ratio in (float(r) for r in args.ratios.split(",")):
        masker = build_masker("random", ratio)
        items = []
        for i in range(args.batch):
            sample = Tokens(values[i], coords[i], grid=tokens.grid)
            items.append((sample, masker(sample, torch.Generator().manual_seed(i)), None, str(i)))
        batch = collate(items)
        mask = batch.mask
        for kind in ("visible", "all"):  # warm-up
            step(kind, batch, mask)
        rows = {"visible": [], "all": []}
        enc = {"visible": [], "all": []}
        budget = Budget(args.seconds, args.min_steps, args.max_steps)
        order = ["visible", "all"]
        while budget.more():
            for kind in order:
                rows[kind].append(step(kind, batch, mask))
                enc[kind].append(encoder_only(kind, mask))
            order.reverse()
        times = {k: median([r["step_s"] for r in v]) for k, v in rows.items()}
        enc_times = {k: median(v) for k, v in enc.items()}
        keep = mask.num_visible
        f_vis, f_all = flops_per_image(model, n, keep), flops_per_image(model, n, n)
        r = {"visible_step_s": times["visible"], "all_step_s": times["all"],
             "step_speedup": times["all"] / times["visible"],
             "encoder_speedup": enc_times["all"] / enc_times["visible"],
             "flop_ratio_step": f_all["step"] / f_vis["step"],
             "flop_ratio_encoder": f_all["encoder"] / f_vis["encoder"],
             "visible_images_per_s": args.batch / times["visible"], "all_images_per_s": args.batch / times["all"],
             "visible_tokens": keep, "steps_timed": len(rows["visible"])}
        out[str(ratio)] = r
        print(f"  mask {ratio}: {keep} of {n} tokens visible; step visible-only {times['visible']:.2f}s "
              f"({r['visible_images_per_s']:.1f} img/s) vs mask tokens in encoder {times['all']:.2f}s "
              f"({r['all_images_per_s']:.1f} img/s) -> {r['step_speedup']:.2f}x (FLOPs predict "
              f"{r['flop_ratio_step']:.2f}x); encoder fwd+bwd alone {r['encoder_speedup']:.2f}x "
              f"(FLOPs predict {r['flop_ratio_encoder']:.2f}x)")
    main_ratio = out.get("0.75")
    if main_ratio:
        reached = main_ratio["step_speedup"] >= 3.0
        near_flops = main_ratio["step_speedup"] >= 0.8 * main_ratio["flop_ratio_step"]
        out["verdict"] = (f"{'PASS' if reached or near_flops else 'FAIL'}: visible-only encoder at mask 0.75 is "
                          f"{main_ratio['step_speedup']:.2f}x faster per training step "
                          f"({'>=' if reached else 'below'} MAE's 3x; its FLOPs allow "
                          f"{main_ratio['flop_ratio_step']:.2f}x with ViT-B + 8-block decoder), encoder alone "
                          f"{main_ratio['encoder_speedup']:.2f}x")
    else:
        out["verdict"] = "visible-only speed-ups: " + ", ".join(f"{k}: {v['step_speedup']:.2f}x"
                                                                 for k, v in out.items() if k[0].isdigit())
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
