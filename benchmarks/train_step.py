"""polymae's image MAE vs Hugging Face ViTMAEForPreTraining: one training step, same everything.

Two shapes (`--shape`):
- vit-s (HF's ViT-S/16 MAE): 224x224 RGB, patch 16, encoder 384 wide x 12 blocks x 6
  heads (MLP 1536), decoder 256 wide x 4 blocks x 8 heads (MLP 1024), norm-pix loss,
  batch 32, mask ratio 0.75;
- tiny (the embedded default's model, configs/image/mae_vit_digits.yaml, where every
  CPU user starts): 8x8 grey, patch 2 (16 tokens), encoder 128 x 4 x 4 heads,
  decoder 64 x 1 x 4 heads, plain pixel loss, batch 64, mask ratio 0.6.
Both: AdamW, forward + backward + step.

Both models start from the same weights (HF's, converted with
`polymae.modalities.image.hf_interop.from_hf_vitmae`), see the same photos and the same
masking noise (HF's `noise=`; polymae's Mask from the same noise), in one
process with the same threads, alternating step by step, in fp32 and under
bf16 autocast. HF runs with attn_implementation="sdpa" and torch's default
AdamW; polymae with its default kernels and fused AdamW (what its trainer uses).

Prints the CPU model and the flags the kernel choices read (amx, avx512_bf16), images/s
for both, the ratio, the losses of the first step (same weights: they must agree to
numerical noise), the step's time over the time its matmul FLOPs take at the rate of a
2048^3 matmul of the same dtype measured in-process, the share of the matmul limit at the
model's own shapes it reaches (the step's matmuls run alone as bare products over the step's
time: tens of tokens by 128 run far below the 2048^3 rate), and the path each of polymae's ops
took (shared/kernels.py measures them at first use).

    python benchmarks/train_step.py [--shape vit-s,tiny] [--seconds 120] [--precision bf16,fp32] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Budget, adamw, machine, matmul_gflops, median, photo_batch,  # noqa: E402
                    set_threads, timed_step)

TARGETS = {("vit-s", "bf16"): 2.0, ("vit-s", "fp32"): 1.2, ("tiny", "bf16"): 2.0, ("tiny", "fp32"): None}
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}  # relative, first step from identical weights
SHAPES = {
    "vit-s": {"image": 224, "patch": 16, "channels": 3, "batch": 32, "width": 384, "depth": 12, "heads": 6,
              "decoder_width": 256, "decoder_depth": 4, "decoder_heads": 8, "norm_pix": True, "mask_ratio": 0.75},
    "tiny": {"image": 8, "patch": 2, "channels": 1, "batch": 64, "width": 128, "depth": 4, "heads": 4,
             "decoder_width": 64, "decoder_depth": 1, "decoder_heads": 4, "norm_pix": False, "mask_ratio": 0.6},
}


def hf_mae_config(shape: dict):
    from transformers import ViTMAEConfig

    return ViTMAEConfig(image_size=shape["image"], patch_size=shape["patch"], num_channels=shape["channels"],
                        hidden_size=shape["width"], num_hidden_layers=shape["depth"],
                        num_attention_heads=shape["heads"], intermediate_size=4 * shape["width"],
                        decoder_hidden_size=shape["decoder_width"], decoder_num_hidden_layers=shape["decoder_depth"],
                        decoder_num_attention_heads=shape["decoder_heads"],
                        decoder_intermediate_size=4 * shape["decoder_width"], mask_ratio=shape["mask_ratio"],
                        norm_pix_loss=shape["norm_pix"], layer_norm_eps=1e-6, hidden_act="gelu",
                        attn_implementation="sdpa")


def step_matmuls(config, num_tokens: int, keep: int, d_in: int, batch: int) -> list[tuple[int, int, int, int]]:
    """The matmuls of one training step of the MAE runs, as (count, m, k, n) products of [m, k] x
    [k, n]: encoder on [cls] + visible tokens, decoder on [cls] + all, head on all tokens;
    forward, then backward's input and weight gradients (the patch embedding needs no input
    gradient). Attention's q k^T and p v are per sample and head."""
    c = config
    forward, attention = [], []  # linears (rows, in, out); attention products (count, m, k, n)

    def blocks(depth, width, mlp, heads, tokens):
        for _ in range(depth):
            forward.extend([(batch * tokens, width, 3 * width), (batch * tokens, width, width),
                            (batch * tokens, width, mlp), (batch * tokens, mlp, width)])
            head = width // heads
            attention.extend([(batch * heads, tokens, head, tokens), (batch * heads, tokens, tokens, head)])

    blocks(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, keep + 1)
    forward.append((batch * (keep + 1), c.hidden_size, c.decoder_hidden_size))
    blocks(c.decoder_num_hidden_layers, c.decoder_hidden_size, c.decoder_intermediate_size,
           c.decoder_num_attention_heads, num_tokens + 1)
    forward.append((batch * num_tokens, c.decoder_hidden_size, d_in))
    products = [(1, m, k, n) for m, k, n in forward]
    products += [(1, m, n, k) for m, k, n in forward]                     # input gradients
    products += [(1, k, m, n) for m, k, n in forward]                     # weight gradients
    products += [(count, m, k, n) for count, m, k, n in attention]
    products += [(count, m, n, k) for count, m, k, n in attention] * 2    # both inputs' gradients
    products.append((1, batch * keep, d_in, c.hidden_size))               # the embedding's forward
    products.append((1, d_in, batch * keep, c.hidden_size))               # and its weight gradient
    return products


def matmul_flops(products: list[tuple[int, int, int, int]]) -> float:
    return sum(2 * count * m * k * n for count, m, k, n in products)


def own_shape_matmul_seconds(products: list[tuple[int, int, int, int]], dtype: torch.dtype,
                             repeats: int = 3) -> float:
    """The best of `repeats` runs of exactly the step's matmuls as bare torch products, back to
    back: the matmul limit at the model's own shapes (small ones run far below the 2048^3 rate)."""
    operands = [(torch.randn(count, m, k, dtype=dtype), torch.randn(count, k, n, dtype=dtype))
                for count, m, k, n in products]
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        for a, b in operands:
            torch.bmm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def build(shape: dict, batch_size: int):
    from transformers import ViTMAEForPreTraining

    from polymae.modalities.image.tokenizer import patchify
    from polymae.modalities.image.hf_interop import fill_hf_sincos_tables, from_hf_vitmae, hf_noise_to_mask
    from polymae.shared.tokens import Batch

    torch.manual_seed(0)
    config = hf_mae_config(shape)
    hf = ViTMAEForPreTraining(config)
    fill_hf_sincos_tables(hf)  # transformers 5.x leaves them at zero in a model built from a config
    hf.train()
    model = from_hf_vitmae(hf).train()
    pixels = photo_batch(batch_size, shape["image"])
    if shape["channels"] == 1:
        pixels = pixels.mean(1, keepdim=True)
    num_tokens = (shape["image"] // shape["patch"]) ** 2
    noise = torch.rand(batch_size, num_tokens, generator=torch.Generator().manual_seed(1))
    tokens = patchify(pixels, shape["patch"])
    batch = Batch(streams={"image": tokens}, mask=hf_noise_to_mask(noise, config.mask_ratio))
    assert torch.equal(hf.patchify(pixels), tokens.values)
    return config, hf, model, pixels, noise, batch


def make_steps(hf, model, pixels, noise, batch, fused: bool, norm_pix: bool):
    from polymae.shared.objectives import LossTerms

    terms = LossTerms({"pixel": {"weight": 1.0, "norm_pix": norm_pix}}, ["image"])
    optimizers = {"hf": adamw(hf.parameters(), fused=False), "polymae": adamw(model.parameters(), fused=fused)}

    def forward_hf():
        return hf(pixel_values=pixels, noise=noise).loss

    def forward_polymae():
        return terms(model(batch), batch)[0]

    def step(name, forward, precision):
        return timed_step(optimizers[name], forward, precision)

    return {"hf": lambda p: step("hf", forward_hf, p), "polymae": lambda p: step("polymae", forward_polymae, p)}, \
        optimizers


def run_precision(precision, hf, model, hf_state, pm_state, pixels, noise, batch, args, norm_pix: bool,
                  batch_size: int):
    hf.load_state_dict(hf_state)
    model.load_state_dict(pm_state)
    steps, optimizers = make_steps(hf, model, pixels, noise, batch, fused=not args.no_fused, norm_pix=norm_pix)
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
        result[name]["images_per_s"] = batch_size / result[name]["step_s"]
    hf_loss, pm_loss = result["first_loss"]["hf"], result["first_loss"]["polymae"]
    result["first_loss_rel_diff"] = abs(hf_loss - pm_loss) / abs(hf_loss)
    result["losses_agree"] = result["first_loss_rel_diff"] <= LOSS_TOLERANCE[precision]
    result["ratio"] = result["polymae"]["images_per_s"] / result["hf"]["images_per_s"]
    result["cpu_ratio"] = result["hf"]["cpu_s"] / result["polymae"]["cpu_s"]
    return result


def main(argv=None) -> dict:
    from polymae.shared import kernels

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="vit-s,tiny", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=None, help="default: the shape's")
    parser.add_argument("--precision", default="bf16,fp32")
    parser.add_argument("--seconds", type=float, default=120.0, help="timing budget per shape and precision")
    parser.add_argument("--min-steps", type=int, default=2, help="timed steps per model, at least")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="exactly this many timed steps per model")
    parser.add_argument("--threads", default=None, help="a number, or auto (see common.set_threads)")
    parser.add_argument("--no-fused", action="store_true", help="polymae with torch's default AdamW too")
    parser.add_argument("--quick", action="store_true", help="small batches, one timed step, small budget")
    args = parser.parse_args(argv)
    if args.quick:
        args.min_steps, args.max_steps, args.seconds = 1, 2, 10.0
    if args.steps:
        args.min_steps = args.max_steps = args.steps
    threads = set_threads(args.threads)
    precisions = args.precision.split(",")
    cpu = kernels.cpu_features()
    limits = {p: matmul_gflops(torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
    out = {"machine": machine(), "threads_note": threads, "amx": cpu.amx, "avx512_bf16": cpu.avx512_bf16,
           "matmul_gflops": limits}
    print(f"train_step: {threads}, {cpu.model} (load {out['machine']['load_avg_1min']}); flags: amx "
          f"{'yes' if cpu.amx else 'no'}, avx512_bf16 {'yes' if cpu.avx512_bf16 else 'no'}")
    print("  matmul rate (2048^3, torch.mm): " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in limits.items()))
    parts, ok = [], True
    for shape_name in args.shape.split(","):
        shape = SHAPES[shape_name]
        batch_size = args.batch or (min(shape["batch"], 4) if args.quick else shape["batch"])
        config, hf, model, pixels, noise, batch = build(shape, batch_size)
        hf_state, pm_state = copy.deepcopy(hf.state_dict()), copy.deepcopy(model.state_dict())
        num_tokens, keep = batch.mask.ids_restore.shape[1], batch.mask.num_visible
        products = step_matmuls(config, num_tokens, keep, batch.tokens.values.shape[-1], batch_size)
        flops = matmul_flops(products)
        out[shape_name] = {"batch": batch_size, "model_matmul_gflop_per_step": flops / 1e9}
        print(f"{shape_name}: {shape['image']}px, patch {shape['patch']}, {shape['width']} x {shape['depth']} "
              f"(decoder {shape['decoder_width']} x {shape['decoder_depth']}), mask {shape['mask_ratio']}, "
              f"{'norm-pix' if shape['norm_pix'] else 'pixel'} loss, batch {batch_size}: "
              f"model matmuls {flops / 1e9:.1f} GFLOP per step")
        for precision in precisions:
            r = run_precision(precision, hf, model, hf_state, pm_state, pixels, noise, batch, args,
                              shape["norm_pix"], batch_size)
            matmul_s = flops / (limits[precision] * 1e9)
            r["step_over_matmul"] = {k: r[k]["step_s"] / matmul_s for k in ("hf", "polymae")}
            # the limit at the model's own shapes: its matmuls alone, as bare products, this moment
            own_s = own_shape_matmul_seconds(products, torch.bfloat16 if precision == "bf16" else torch.float32)
            r["own_shape_matmul_s"] = own_s
            r["share_of_own_shape_limit"] = {k: own_s / r[k]["step_s"] for k in ("hf", "polymae")}
            target = TARGETS[(shape_name, precision)]
            out[shape_name][precision] = r
            print(f"  {precision}: HF {r['hf']['images_per_s']:.1f} img/s, polymae {r['polymae']['images_per_s']:.1f}"
                  f" img/s -> {r['ratio']:.2f}x (target {f'{target}x' if target else 'none'}; CPU-time ratio "
                  f"{r['cpu_ratio']:.2f}x; {r['steps_timed']} steps each)")
            for k in ("hf", "polymae"):
                s = r[k]
                print(f"    {k:8s} step {s['step_s']:.3f}s = fwd {s['forward_s']:.3f} + bwd {s['backward_s']:.3f} + "
                      f"opt {s['optimizer_s']:.3f} ({r['optimizer'][k]}); {r['step_over_matmul'][k]:.2f}x its "
                      f"matmul time at the {precision} 2048^3 rate; {100 * r['share_of_own_shape_limit'][k]:.0f}% "
                      f"of the limit at its own shapes (its matmuls alone: {r['own_shape_matmul_s']:.3f}s)")
            print(f"    first-step loss (same weights): HF {r['first_loss']['hf']:.6f}, polymae "
                  f"{r['first_loss']['polymae']:.6f}, rel diff {r['first_loss_rel_diff']:.1e} "
                  f"({'agree' if r['losses_agree'] else 'DISAGREE'}, tolerance {LOSS_TOLERANCE[precision]:.0e}); "
                  f"last: HF {r['last_loss']['hf']:.5f}, polymae {r['last_loss']['polymae']:.5f}")
            met = (target is None or r["ratio"] >= target) and r["losses_agree"]
            ok &= met
            parts.append(f"{shape_name} {precision} {r['ratio']:.2f}x"
                         + (f" (target {target}x{'' if met else ', NOT met'})" if target else ""))
    out["kernel_paths"] = kernels.chosen_paths()
    print("  kernel paths (measured at first use):")
    for key, path in sorted(out["kernel_paths"].items()):
        print(f"    {key:48s} {path}")
    agree = all(out[s][p]["losses_agree"] for s in args.shape.split(",") for p in precisions)
    out["verdict"] = (f"{'PASS' if ok else 'FAIL'}: polymae vs HF ViTMAE training step: " + ", ".join(parts)
                      + ("; losses agree" if agree else "; LOSSES DISAGREE"))
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
