"""polymae's image MAE vs Hugging Face ViTMAEForPreTraining: one training step, same everything.

Architecture (HF's ViT-S/16 MAE shape): 224x224, patch 16, encoder 384 wide x 12
blocks x 6 heads (MLP 1536), decoder 256 wide x 4 blocks x 8 heads (MLP 1024),
mask ratio 0.75, norm-pix loss, batch 32, AdamW, forward + backward + step.

Both models start from the same weights (HF's, converted with
`polymae.modalities.image.hf_interop.from_hf_vitmae`), see the same photos and the same
masking noise (HF's `noise=`; polymae's Mask from the same noise), in one
process with the same threads, alternating step by step, in fp32 and under
bf16 autocast. HF runs with attn_implementation="sdpa" and torch's default
AdamW; polymae with its default kernels and fused AdamW (what its trainer uses).

Prints images/s for both, the ratio, the losses of the first step (same
weights: they must agree to numerical noise) and the fraction of the bf16
matmul limit (a 2048^3 bf16 matmul, measured in-process) that the model's
matmul FLOPs reach.

    python benchmarks/train_step.py [--batch 32] [--seconds 120] [--precision bf16,fp32] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Budget, adamw, machine, matmul_gflops, median, photo_batch,  # noqa: E402
                    set_threads, timed_step)

TARGETS = {"bf16": 2.0, "fp32": 1.2}
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # relative, first step from identical weights


def hf_vit_small_mae(image: int, patch: int):
    from transformers import ViTMAEConfig

    return ViTMAEConfig(image_size=image, patch_size=patch, num_channels=3, hidden_size=384, num_hidden_layers=12,
                        num_attention_heads=6, intermediate_size=1536, decoder_hidden_size=256,
                        decoder_num_hidden_layers=4, decoder_num_attention_heads=8, decoder_intermediate_size=1024,
                        mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6, hidden_act="gelu",
                        attn_implementation="sdpa")


def matmul_flops_per_image(config, num_tokens: int, keep: int, d_in: int) -> float:
    """Matmul FLOPs of one image's training step (forward + backward) for the MAE polymae runs:
    encoder on [cls] + visible tokens, decoder on [cls] + all, head on all tokens. Backward is
    twice forward, except that the patch embedding needs no input gradient."""
    def blocks(depth, width, mlp, tokens):
        linear = 2 * tokens * (4 * width * width + 2 * width * mlp)
        attention = 4 * tokens * tokens * width  # q k^T and p v over all heads
        return depth * (linear + attention)

    c = config
    embed = 2 * keep * d_in * c.hidden_size
    forward = (embed + blocks(c.num_hidden_layers, c.hidden_size, c.intermediate_size, keep + 1)
               + 2 * (keep + 1) * c.hidden_size * c.decoder_hidden_size
               + blocks(c.decoder_num_hidden_layers, c.decoder_hidden_size, c.decoder_intermediate_size, num_tokens + 1)
               + 2 * num_tokens * c.decoder_hidden_size * d_in)
    return 3 * forward - embed


def build(args):
    from transformers import ViTMAEForPreTraining

    from polymae.modalities.image.tokenizer import patchify
    from polymae.modalities.image.hf_interop import fill_hf_sincos_tables, from_hf_vitmae, hf_noise_to_mask
    from polymae.shared.tokens import Batch

    torch.manual_seed(0)
    config = hf_vit_small_mae(args.image, args.patch)
    hf = ViTMAEForPreTraining(config)
    fill_hf_sincos_tables(hf)  # transformers 5.x leaves them at zero in a model built from a config
    hf.train()
    model = from_hf_vitmae(hf).train()
    pixels = photo_batch(args.batch, args.image)
    num_tokens = (args.image // args.patch) ** 2
    noise = torch.rand(args.batch, num_tokens, generator=torch.Generator().manual_seed(1))
    tokens = patchify(pixels, args.patch)
    batch = Batch(streams={"image": tokens}, mask=hf_noise_to_mask(noise, config.mask_ratio))
    assert torch.equal(hf.patchify(pixels), tokens.values)
    return config, hf, model, pixels, noise, batch


def make_steps(hf, model, pixels, noise, batch, fused: bool):
    from polymae.shared.objectives import LossTerms

    terms = LossTerms({"pixel": {"weight": 1.0, "norm_pix": True}}, ["image"])
    optimizers = {"hf": adamw(hf.parameters(), fused=False), "polymae": adamw(model.parameters(), fused=fused)}

    def forward_hf():
        return hf(pixel_values=pixels, noise=noise).loss

    def forward_polymae():
        return terms(model(batch), batch)[0]

    def step(name, forward, precision):
        return timed_step(optimizers[name], forward, precision)

    return {"hf": lambda p: step("hf", forward_hf, p), "polymae": lambda p: step("polymae", forward_polymae, p)}, \
        optimizers


def run_precision(precision, hf, model, hf_state, pm_state, pixels, noise, batch, args):
    hf.load_state_dict(hf_state)
    model.load_state_dict(pm_state)
    steps, optimizers = make_steps(hf, model, pixels, noise, batch, fused=not args.no_fused)
    first = {name: steps[name](precision) for name in ("hf", "polymae")}  # same weights: the loss check
    records = {"hf": [], "polymae": []}
    budget = Budget(args.seconds, args.min_steps, args.max_steps)
    order = ["hf", "polymae"]
    while budget.more():
        for name in order:
            records[name].append(steps[name](precision))
        order.reverse()  # neither model always runs right after the other
    result = {"first_loss": {k: v["loss"] for k, v in first.items()},
              "last_loss": {k: v[-1]["loss"] for k, v in records.items()}, "steps_timed": len(records["hf"]),
              "optimizer": {k: ("fused" if o.defaults.get("fused") else "foreach/default")
                            for k, o in optimizers.items()}}
    for name, rows in records.items():
        result[name] = {key: median([r[key] for r in rows])
                        for key in ("step_s", "forward_s", "backward_s", "optimizer_s", "cpu_s")}
        result[name]["images_per_s"] = args.batch / result[name]["step_s"]
    hf_loss, pm_loss = result["first_loss"]["hf"], result["first_loss"]["polymae"]
    result["first_loss_rel_diff"] = abs(hf_loss - pm_loss) / abs(hf_loss)
    result["losses_agree"] = result["first_loss_rel_diff"] <= LOSS_TOLERANCE[precision]
    result["ratio"] = result["polymae"]["images_per_s"] / result["hf"]["images_per_s"]
    result["cpu_ratio"] = result["hf"]["cpu_s"] / result["polymae"]["cpu_s"]
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--precision", default="bf16,fp32")
    parser.add_argument("--seconds", type=float, default=120.0, help="timing budget per precision")
    parser.add_argument("--min-steps", type=int, default=2, help="timed steps per model, at least")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="exactly this many timed steps per model")
    parser.add_argument("--threads", default=None, help="a number, or auto (see common.set_threads)")
    parser.add_argument("--no-fused", action="store_true", help="polymae with torch's default AdamW too")
    parser.add_argument("--quick", action="store_true", help="batch 4, one timed step, small budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.min_steps, args.max_steps, args.seconds = min(args.batch, 4), 1, 2, 10.0
    if args.steps:
        args.min_steps = args.max_steps = args.steps
    threads = set_threads(args.threads)

    config, hf, model, pixels, noise, batch = build(args)
    hf_state, pm_state = copy.deepcopy(hf.state_dict()), copy.deepcopy(model.state_dict())
    num_tokens, keep = batch.mask.ids_restore.shape[1], batch.mask.num_visible
    flops = matmul_flops_per_image(config, num_tokens, keep, batch.tokens.values.shape[-1]) * args.batch
    limit = matmul_gflops(torch.bfloat16)
    out = {"machine": machine(), "threads_note": threads, "batch": args.batch, "bf16_matmul_gflops": limit,
           "fp32_matmul_gflops": matmul_gflops(torch.float32), "model_matmul_gflop_per_step": flops / 1e9}
    print(f"train_step: ViT-S/16 MAE {args.image}px, mask 0.75, norm-pix, batch {args.batch}, "
          f"{threads}, {out['machine']['cpu']} (load {out['machine']['load_avg_1min']})")
    print(f"  matmul limit: bf16 {limit:.0f} GFLOP/s, fp32 {out['fp32_matmul_gflops']:.0f} GFLOP/s (2048^3, torch.mm); "
          f"model matmuls {flops / 1e9:.1f} GFLOP per step")
    for precision in args.precision.split(","):
        r = run_precision(precision, hf, model, hf_state, pm_state, pixels, noise, batch, args)
        r["bf16_limit_fraction"] = {k: flops / r[k]["step_s"] / 1e9 / limit for k in ("hf", "polymae")}
        out[precision] = r
        print(f"  {precision}: HF {r['hf']['images_per_s']:.2f} img/s, polymae {r['polymae']['images_per_s']:.2f} img/s"
              f" -> {r['ratio']:.2f}x (target {TARGETS[precision]}x; CPU-time ratio {r['cpu_ratio']:.2f}x; "
              f"{r['steps_timed']} steps each)")
        for k in ("hf", "polymae"):
            s = r[k]
            print(f"    {k:8s} step {s['step_s']:.3f}s = fwd {s['forward_s']:.3f} + bwd {s['backward_s']:.3f} + "
                  f"opt {s['optimizer_s']:.3f} ({r['optimizer'][k]}); "
                  f"{r['bf16_limit_fraction'][k]:.1%} of the bf16 matmul limit")
        print(f"    first-step loss (same weights): HF {r['first_loss']['hf']:.6f}, polymae "
              f"{r['first_loss']['polymae']:.6f}, rel diff {r['first_loss_rel_diff']:.1e} "
              f"({'agree' if r['losses_agree'] else 'DISAGREE'}, tolerance {LOSS_TOLERANCE[precision]:.0e}); "
              f"last: HF {r['last_loss']['hf']:.5f}, polymae {r['last_loss']['polymae']:.5f}")
    parts = []
    ok = True
    for precision in args.precision.split(","):
        r = out[precision]
        met = r["ratio"] >= TARGETS[precision] and r["losses_agree"]
        ok &= met
        parts.append(f"{precision} {r['ratio']:.2f}x (target {TARGETS[precision]}x{'' if met else ', NOT met'})")
    out["verdict"] = (f"{'PASS' if ok else 'FAIL'}: polymae vs HF ViTMAE training step: " + ", ".join(parts)
                      + ("; losses agree" if all(out[p]["losses_agree"] for p in args.precision.split(","))
                         else "; LOSSES DISAGREE"))
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
