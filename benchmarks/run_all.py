"""Run every benchmark (what `make bench` calls) and rewrite benchmarks/README.md with the figures.

    python benchmarks/run_all.py [--quick] [--threads auto|N] [--bf16 auto|on|off]
                                 [--only train_step,visible_only,pipeline,text_step,text_pipeline,graph_step]

Each benchmark runs in a fresh process of its own (its contenders alternate
inside it) with a time budget so the whole run stays under 10 minutes on a
2-core CPU; each prints its own figures and a one-line verdict. Run one
after another in one process, a benchmark inherited the last one's heap:
the pipeline's workers, forked from a process that had just trained ViT-B,
ran 0.64x of decode-only where alone they ran 0.72-0.80x. The README keeps what is written above its results
marker and gets the latest figures, the date and the machine below it.

`--bf16 auto` (the default) measures once whether this CPU runs bf16 matmuls
natively: an AVX2-only CPU emulates them, 20-70x slower than fp32 (a ViT-B
bf16 step takes minutes), so there train_step runs fp32 only, visible_only
(bf16 only) is skipped and says why, and text_step times bf16 at a small
batch (it decides that itself); `--bf16 on` runs everything as written.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import sys
import time
import traceback
from pathlib import Path
from queue import Empty

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

MARKER = "<!-- results: written by benchmarks/run_all.py; everything below this line is replaced -->"


NAMES = ("train_step", "visible_only", "pipeline", "text_step", "text_pipeline", "graph_step", "video_step",
         "video_pipeline")


def _bf16_emulated(results) -> None:
    import torch

    def best(dtype):
        a = torch.randn(512, 512, dtype=dtype)
        a @ a
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    results.put(best(torch.bfloat16) > best(torch.float32))


def bf16_emulated() -> bool:
    """Whether a bf16 matmul runs slower than the same fp32 one here (an AVX2-only CPU emulates bf16).
    Measured in a process of its own: a matmul here would start OpenMP's thread pool in this process,
    and a benchmark forked from it would hang at its first parallel op."""
    context = multiprocessing.get_context()
    queue = context.Queue()
    process = context.Process(target=_bf16_emulated, args=(queue,))
    process.start()
    try:
        return queue.get(timeout=120)
    finally:
        process.join()


def plans(quick: bool, threads: str, bf16: bool = True) -> dict[str, list[str] | str]:
    """Each benchmark's arguments, or the reason it is skipped."""
    if quick:
        out = {"train_step": ["--quick", "--threads", threads], "visible_only": ["--quick", "--threads", threads],
               "pipeline": ["--quick"], "text_step": ["--quick", "--threads", threads], "text_pipeline": ["--quick"],
               "graph_step": ["--quick", "--threads", threads], "video_step": ["--quick", "--threads", threads],
               "video_pipeline": ["--quick"]}
    else:
        out = {"train_step": ["--seconds", "70", "--threads", threads],
               "visible_only": ["--seconds", "20", "--threads", threads],
               "pipeline": ["--repeats", "3"],
               "text_step": ["--seconds", "60", "--threads", threads],
               "text_pipeline": ["--repeats", "3"],
               "graph_step": ["--seconds", "45", "--repeats", "7", "--threads", threads],
               "video_step": ["--seconds", "60", "--max-steps", "3", "--threads", threads],
               "video_pipeline": ["--repeats", "3"]}
    if not bf16:
        out["train_step"] += ["--precision", "fp32"]
        out["video_step"] += ["--precision", "fp32"]
        out["visible_only"] = ("SKIPPED: bf16-only, and this CPU emulates bf16 matmuls (slower than fp32; a run "
                               "would take over an hour); figures from a CPU with native bf16 are kept above")
    return out


def run_one(name: str, argv: list[str], results) -> None:
    """In a fresh process: the benchmark's `main(argv)`, its figures put on `results`."""
    try:
        results.put(__import__(name).main(argv))
    except Exception as error:  # noqa: BLE001  one broken benchmark must not hide the others' figures
        traceback.print_exc()
        results.put({"verdict": f"ERROR: {type(error).__name__}: {error}"})


def run(names: list[str], quick: bool, threads: str, bf16: bool = True) -> dict:
    context = multiprocessing.get_context()  # the platform's way, as when a benchmark is run alone
    results = {}
    for name, argv in plans(quick, threads, bf16).items():
        if name not in names:
            continue
        if isinstance(argv, str):
            print(f"\n== {name}: {argv}", flush=True)
            results[name] = {"verdict": argv, "seconds": 0.0}
            continue
        print(f"\n== {name} {' '.join(argv)}", flush=True)
        start = time.perf_counter()
        queue = context.Queue()
        process = context.Process(target=run_one, args=(name, argv, queue))
        process.start()
        while True:
            try:
                results[name] = queue.get(timeout=5)
                break
            except Empty:
                if not process.is_alive():
                    results[name] = {"verdict": f"ERROR: the benchmark's process died (exit code {process.exitcode})"}
                    break
        process.join()
        results[name]["seconds"] = time.perf_counter() - start
    return results


def fmt(value, spec=".2f"):
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def train_step_section(r: dict) -> list[str]:
    rates = ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in r.get("matmul_gflops", {}).items())
    lines = ["### train_step: polymae vs Hugging Face ViTMAEForPreTraining", "",
             f"vit-s: ViT-S/16 MAE at 224px (HF's architecture), norm-pix loss, batch 32, mask 0.75; tiny: the "
             f"default recipe's model (8x8 grey, 16 tokens, 128 x 4, decoder 64 x 1), pixel loss, batch 64, "
             f"mask 0.6. AdamW, forward + backward + step; {r.get('threads_note', '')}; CPU flags: amx "
             f"{'yes' if r.get('amx') else 'no'}, avx512_bf16 {'yes' if r.get('avx512_bf16') else 'no'}. "
             f"Matmul rate in-process (2048^3 torch.mm): {rates}.", "",
             "| shape | precision | HF img/s | polymae img/s | ratio | target | HF fwd/bwd/opt s | polymae fwd/bwd/opt s "
             "| step / its matmul time (HF / polymae) | first-step loss HF / polymae (rel diff) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in ("vit-s", "tiny"):
        for precision in ("bf16", "fp32"):
            p = r.get(shape, {}).get(precision)
            if not p:
                continue
            h, m = p["hf"], p["polymae"]
            target = {("vit-s", "bf16"): "2.0x", ("vit-s", "fp32"): "1.2x", ("tiny", "bf16"): "2.0x"}.get(
                (shape, precision), "none")
            lines.append(
                f"| {shape} | {precision} | {h['images_per_s']:.1f} | {m['images_per_s']:.1f} | **{p['ratio']:.2f}x** "
                f"| {target} | {h['forward_s']:.3f} / {h['backward_s']:.3f} / {h['optimizer_s']:.3f} | "
                f"{m['forward_s']:.3f} / {m['backward_s']:.3f} / {m['optimizer_s']:.3f} | "
                f"{p['step_over_matmul']['hf']:.2f}x / {p['step_over_matmul']['polymae']:.2f}x | "
                f"{p['first_loss']['hf']:.6f} / {p['first_loss']['polymae']:.6f} ({p['first_loss_rel_diff']:.1e}) |")
    paths = r.get("kernel_paths", {})
    if paths:
        lines += ["", "Kernel paths polymae measured and took: "
                  + "; ".join(f"{key}: {path}" for key, path in sorted(paths.items())) + "."]
    return lines


def visible_only_section(r: dict) -> list[str]:
    lines = ["### visible_only: encoder on visible tokens (MAE) vs mask tokens in the encoder (SimMIM style)", "",
             f"ViT-B/16 at 224px + 512-wide decoder (8 blocks: MAE's default; 1 block: its lightest), bf16 "
             f"autocast, batch {r.get('batch')}, one training step; {r.get('threads_note', '')}.", "",
             "| decoder blocks | mask ratio | visible tokens | visible-only s/step | all tokens s/step | step speed-up | "
             "FLOPs predict | encoder fwd+bwd speed-up | FLOPs predict |", "|---|---|---|---|---|---|---|---|---|"]
    for v in r.get("runs", []):
        lines.append(f"| {v['decoder_depth']} | {v['ratio']} | {v['visible_tokens']} | {v['visible_step_s']:.2f} | "
                     f"{v['all_step_s']:.2f} | **{v['step_speedup']:.2f}x** | {v['flop_ratio_step']:.2f}x | "
                     f"{v['encoder_speedup']:.2f}x | {v['flop_ratio_encoder']:.2f}x |")
    return lines


def pipeline_section(r: dict) -> list[str]:
    if "ratio" not in r:
        return ["### pipeline", ""]
    runs = r["all_runs"]
    order = ("decode", "decode_pil", "random", "green")
    rounds = [" / ".join(f"{runs[k][i]:.0f}" for k in order) for i in range(len(runs["decode"]))]
    return ["### pipeline: shards -> decode -> augment -> tokenize -> mask -> batch vs decode only", "",
            f"{r['images']} JPEGs of 256px (~{r['jpeg_kb']:.0f} KB) in WebDataset shards, batch {r['batch']}, "
            f"{r['workers']} DataLoader workers, timed from the second epoch on (the workers persist across "
            f"epochs); rounds of decode-only (libjpeg-turbo through simplejpeg, the pipeline's decoder; then PIL, "
            f"same pixels), random and green back to back, ratios the median over the rounds.", "",
            "| decode only (1 process), pipeline's decoder, img/s | decode only, PIL, img/s | pipeline, random mask "
            "img/s | ratio to the pipeline's decoder (target >= 0.9x) | ratio to PIL | pipeline, green (ColorMAE) "
            "mask img/s | green / random (target 0.9-1.1x) |", "|---|---|---|---|---|---|---|",
            f"| {r['decode_images_per_s']:.0f} | {r['decode_pil_images_per_s']:.0f} | {r['random_images_per_s']:.0f} "
            f"| **{r['ratio']:.2f}x** | {r['ratio_pil']:.2f}x | {r['green_images_per_s']:.0f} | "
            f"**{r['green_vs_random']:.2f}x** |", "",
            "Best of the rounds in each column. Rounds (decode / decode with PIL / random / green img/s): "
            + "; ".join(rounds) + ". First epoch, workers starting: "
            + ", ".join(f"{k} {v:.0f} img/s" for k, v in r.get("first_epoch_images_per_s", {}).items()) + ".", "",
            "Where an image's time goes, all stages in one process (ms per image; 'rest' is reading the tar, the "
            "shuffle buffer, per-sample seeding and finishing the batch):", "",
            "| " + " | ".join(r["stage_ms"]) + " | bare decode |", "|" + "---|" * (len(r["stage_ms"]) + 1),
            "| " + " | ".join(f"{v:.3f}" for v in r["stage_ms"].values()) + f" | {1e3 / r['decode_images_per_s']:.3f} |",
            "", f"Two workers with free transfers could reach at best {r['ceiling']:.2f}x of decode-only."]


def text_step_section(r: dict) -> list[str]:
    a = r.get("architecture", {})
    lines = ["### text_step: polymae vs Hugging Face BertForMaskedLM, masked-LM training step", "",
             f"BERT {a.get('layers')} layers x {a.get('width')} wide x {a.get('heads')} heads (MLP "
             f"{a.get('intermediate')}), MiniLM's 30,522-sub-word vocabulary, real fortune cookies in windows of "
             f"{r.get('seq')} sub-words, BERT masking 15% (polymae's masker; HF reads the same corrupted ids and labels "
             f"-100 except at the hidden sub-words), same weights (`from_hf_bert`), fused AdamW for both, forward + "
             f"backward + step; {r.get('threads_note', '')}. Matmul limit in-process: bf16 "
             f"{fmt(r.get('bf16_matmul_gflops'), '.1f')} GFLOP/s (1024^3), fp32 {fmt(r.get('fp32_matmul_gflops'), '.0f')} "
             f"GFLOP/s (2048^3). Ratios are the median of the rounds' own ratios (contenders back to back in each "
             f"round). polymae's vocab head predicts at the hidden sub-words only while training (decoder.rows="
             f"targets, its default), HF's at every position; \"rows=all\" is the same polymae model with its head "
             f"at every position (what it did before, and what next-token recipes set).", "",
             "| precision | batch | HF samples/s | polymae samples/s | ratio | target | HF fwd/bwd/opt s | "
             "polymae fwd/bwd/opt s | polymae rows=all: samples/s, ratio | first-step loss HF / polymae (rel diff) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for precision in ("bf16", "fp32"):
        p = r.get(precision)
        if not p:
            continue
        h, m = p["hf"], p["polymae"]
        proj = p.get("polymae_all_rows")
        lines.append(
            f"| {precision}{' (emulated)' if p.get('emulated') else ''} | {p['batch']} | {h['samples_per_s']:.2f} | "
            f"{m['samples_per_s']:.2f} | **{p['ratio']:.2f}x** | {'1.5' if precision == 'bf16' else '1.2'}x | "
            f"{h['forward_s']:.2f} / {h['backward_s']:.2f} / {h['optimizer_s']:.2f} | "
            f"{m['forward_s']:.2f} / {m['backward_s']:.2f} / {m['optimizer_s']:.2f} | "
            + (f"{proj['samples_per_s']:.2f}, {p['ratios']['polymae_all_rows']:.2f}x" if proj else "n/a")
            + f" | {p['first_loss']['hf']:.6f} / {p['first_loss']['polymae']:.6f} "
              f"({p['first_loss_rel_diff']['polymae']:.1e}) |")
    lines += ["", "Step seconds per round (HF / polymae / polymae rows=all): " + "; ".join(
        f"{precision} " + ", ".join(" / ".join(f"{v[i]:.2f}" for v in p["rounds_step_s"].values())
                                    for i in range(len(p["rounds_step_s"]["hf"])))
        for precision, p in ((k, r[k]) for k in ("bf16", "fp32") if k in r)) + ".", ""]
    for precision in ("bf16", "fp32"):
        p = r.get(precision)
        if p:
            lines.append(f"- {precision}: {p['tokens']} token places ({p['real_tokens']} real, {p['hidden_tokens']} "
                         f"hidden); matmuls {p['matmul_gflop_per_step']['all_positions']:.0f} GFLOP per step with the "
                         f"vocabulary at every place (HF, polymae rows=all; it is {p['vocab_share_of_forward_matmuls']:.0%} of "
                         f"the forward matmuls), {p['matmul_gflop_per_step']['hidden_only']:.0f} at the hidden rows "
                         "only (polymae); polymae's forward by phase as it trains (s, no grad): " + ", ".join(
                             f"{k} {v:.3f}" for k, v in p["polymae_forward_phases_s"].items()))
    return lines


def text_pipeline_section(r: dict) -> list[str]:
    if "ratio" not in r:
        return ["### text_pipeline", ""]
    runs = r["all_runs"]
    order = ("tokenize", "tokenize_1proc", "pipeline")
    rounds = [" / ".join(f"{runs[k][i]:.0f}" for k in order) for i in range(len(runs["pipeline"]))]
    return ["### text_pipeline: shards -> decode -> tokenize -> BERT mask -> batch vs tokenize only", "",
            f"{r['texts']} fortune cookies (~{r['kb_per_text']:.1f} KB per record in the tar) in {r['shards']} "
            f"WebDataset shards written by `shard_source`, MiniLM's WordPiece tokenizer, windows of at most "
            f"{r['seq']}, BERT masking 0.15, batch {r['batch']} padded to its longest text, {r['workers']} DataLoader "
            f"workers, timed from the second epoch on; the reference reads the same records with the same tar "
            f"reader and calls the Hugging Face tokenizer on each text, in {r['workers']} forked processes (every "
            f"other shard each); its 1-process rate printed beside it. Ratios: the median over the rounds.", "",
            f"| tokenize only, {r['workers']} processes, texts/s | tokenize only, 1 process, texts/s | pipeline texts/s "
            f"| ratio (target >= 0.8x) | ratio to 2 x the 1-process loop |", "|---|---|---|---|---|",
            f"| {r['tokenize_texts_per_s']:.0f} | {r['tokenize_1proc_texts_per_s']:.0f} | "
            f"{r['pipeline_texts_per_s']:.0f} | **{r['ratio']:.2f}x** | {r['ratio_1proc_scaled']:.2f}x |", "",
            "Best of the rounds in each column. Rounds (tokenize 2 processes / 1 process / pipeline, texts/s): "
            + "; ".join(rounds) + f". First epoch, workers starting: {r['first_epoch_texts_per_s']:.0f} texts/s; "
            f"{r['batched']} texts batched per epoch, {r['skipped']} skipped and counted (too short).", "",
            "Where a text's time goes, all stages in one process (ms per text; 'rest' is reading the tar, the "
            "shuffle buffer, per-sample seeding and the loader):", "",
            "| " + " | ".join(r["stage_ms"]) + " | bare tokenize-only |", "|" + "---|" * (len(r["stage_ms"]) + 1),
            "| " + " | ".join(f"{v:.3f}" for v in r["stage_ms"].values())
            + f" | {1e3 / r['tokenize_1proc_texts_per_s']:.3f} |",
            "", f"Two workers with free transfers could reach at best {r['ceiling']:.2f}x of tokenize-only."]


def graph_step_section(r: dict) -> list[str]:
    s, b = r.get("step"), r.get("batching")
    if not s or not b:
        return ["### graph_step", ""]
    st = b["stage_us"]
    return ["### graph_step: polymae's GraphMAE step vs a plain torch_geometric loop; molecule batching vs PyG's "
            "DataLoader", "",
            f"1. The recipe's model (`build_parts` of configs/graph/graphmae_nodes.yaml, dropout and attention dropout "
            f"0 so both compute the same maths): 2-layer GAT, width 256, 4 heads, PReLU, bias-free encoder_to_decoder, "
            f"re-mask, 1-head GATConv decoder to the {s['features']} features, scaled cosine error alpha 3; a batch of "
            f"{s['batch']} Drosophila neighbourhoods drawn at random ({s['nodes']} nodes in {s['padded_nodes']} padded "
            f"places, {s['edges']} edges, {s['hidden']} hidden, {s['substituted']} of them with another node's "
            f"features). The reference is the same step written with torch_geometric in the benchmark (its own "
            f"GATConv/PReLU/Linear modules, polymae's weights copied in, a `Batch.from_data_list` of the same graphs, "
            f"the batch's hidden nodes and substitutes as GraphMAE's index tensors); {s['optimizer']} AdamW for both; "
            f"{r.get('threads_note', '')}; the ratio is the median of the rounds' own ratios.", "",
            "| plain PyG steps/s | polymae steps/s | ratio | target | plain PyG fwd/bwd/opt s | polymae fwd/bwd/opt s | "
            "first-step loss PyG / polymae (rel diff) |", "|---|---|---|---|---|---|---|",
            f"| {s['plain_pyg']['steps_per_s']:.3f} | {s['polymae']['steps_per_s']:.3f} | **{s['ratio']:.2f}x** | "
            f"0.95x | {s['plain_pyg']['forward_s']:.3f} / {s['plain_pyg']['backward_s']:.3f} / "
            f"{s['plain_pyg']['optimizer_s']:.4f} | {s['polymae']['forward_s']:.3f} / {s['polymae']['backward_s']:.3f} "
            f"/ {s['polymae']['optimizer_s']:.4f} | {s['first_loss']['plain_pyg']:.7f} / {s['first_loss']['polymae']:.7f} "
            f"({s['first_loss_rel_diff']:.1e}) |", "",
            "Step seconds per round (plain PyG / polymae): " + ", ".join(
                f"{a:.3f} / {p:.3f}" for a, p in zip(s["rounds_step_s"]["plain_pyg"], s["rounds_step_s"]["polymae"]))
            + ". polymae's own layout work per step (no grad): " + ", ".join(
                f"{k} {1e3 * v:.2f} ms" for k, v in s["framework_s"].items()) + ".", "",
            f"2. {b['molecules']} solubility molecules ({b['atoms']} atoms), decoded once into memory, batch "
            f"{b['batch']}, one process, {b['rounds']} rounds of both back to back (median): polymae runs what "
            f"ShardStream.prepare and make_batch run (a generator per molecule and the graph modality's `tokenize` in "
            f"groups of 8, with the recipe's options (no structural coords); then per batch the `graphmae` masker at 0.5 "
            f"/ replace_rate 0.1 writing the masks stacked, `Masker.stacked`, and `collate`); "
            f"`torch_geometric.loader.DataLoader` (num_workers=0) over the same graphs as `Data(x, edge_index, "
            f"edge_attr)` batches only: it does not mask, so the ratio without polymae's masking stage is beside it. "
            f"Same graphs in both: {'yes' if b['same_graphs'] else 'NO'}.", "",
            "| PyG DataLoader molecules/s | polymae molecules/s | ratio (target >= 0.9x) | polymae without its masking "
            "stage | ratio | polymae per molecule: tokenize / mask / collate us | PyG per molecule us |",
            "|---|---|---|---|---|---|---|",
            f"| {b['pyg_molecules_per_s']:.0f} | {b['polymae_molecules_per_s']:.0f} | **{b['ratio']:.2f}x** | "
            f"{b['polymae_minus_mask_molecules_per_s']:.0f} | {b['ratio_minus_mask']:.2f}x | {st['tokenize']:.0f} "
            f"/ {st['mask']:.0f} / {st['collate']:.0f} | {b['pyg_us']:.0f} |", "",
            "Rounds (molecules/s, PyG / polymae): " + ", ".join(
                f"{a:.0f} / {p:.0f}" for a, p in zip(b["all_runs"]["pyg"], b["all_runs"]["polymae"])) + "."]


def video_step_section(r: dict) -> list[str]:
    lines = ["### video_step: polymae's VideoMAE / VideoMAE V2 step vs Hugging Face VideoMAEForPreTraining", "",
             f"ViT-S, {r.get('tokens')} tokens ({r.get('visible')} visible: tube masking 0.9), batch {r.get('batch')}, "
             "same weights, clips and masks; V2 = running-cell decoder mask 50%.", "",
             "| precision | HF clips/s | polymae full / ratio | polymae V2 / ratio | decoder time V2 / full (FLOPs predict) "
             "| first-step loss HF / polymae (rel diff) |", "|---|---|---|---|---|---|"]
    for precision in ("bf16", "fp32"):
        p = r.get(precision)
        if not p:
            continue
        d = p["decoder"]
        lines.append(f"| {precision} | {p['hf']['clips_per_s']:.2f} | {p['polymae']['clips_per_s']:.2f} / "
                     f"{p['ratio_full']:.2f}x | {p['polymae_v2']['clips_per_s']:.2f} / {p['ratio_v2']:.2f}x | "
                     f"{d['measured_ratio']:.2f} ({d['flops_ratio']:.2f}) | {p['first_loss']['hf']:.5f} / "
                     f"{p['first_loss']['polymae']:.5f} ({p['first_loss_rel_diff']:.1e}) |")
    for precision, why in r.get("skipped", {}).items():
        lines.append(f"\n{precision}: {why}.")
    return lines


def video_pipeline_section(r: dict) -> list[str]:
    return ["### video_pipeline: shards -> 16-frame clips (decord) -> tubelets -> masks -> batches vs decode only", "",
            f"{r.get('records')} records x {r.get('clips_per_video')} clips, {r.get('workers')} workers: pipeline "
            f"{fmt(r.get('pipeline_clips_per_s'), '.1f')} clips/s, decord decode-only (1 process) "
            f"{fmt(r.get('decode_clips_per_s'), '.1f')} clips/s, ratio {fmt(r.get('ratio'))}x (runs {r.get('all_runs')})."]


def write_readme(results: dict, quick: bool) -> Path:
    path = HERE / "README.md"
    head = path.read_text().split(MARKER)[0].rstrip() if path.exists() else "# Benchmarks"
    m = common.machine()
    first = next((r.get("machine") for r in results.values() if isinstance(r, dict) and r.get("machine")), m)
    lines = [head, "", MARKER, "",
             f"## Latest figures ({datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
             f"{', --quick: smoke sizes, not comparable' if quick else ''})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['isa']}), torch {m['torch']}; 1-minute load average "
             f"{first.get('load_avg_1min')} at the start (the cores are shared: figures move with the load, "
             "the ratios much less, since each benchmark alternates its contenders step by step).", "",
             "Verdicts:", ""]
    lines += [f"- {name}: {r.get('verdict', 'n/a')} ({r.get('seconds', 0):.0f} s)" for name, r in results.items()]
    lines.append("")
    sections = {"train_step": train_step_section, "visible_only": visible_only_section, "pipeline": pipeline_section,
                "text_step": text_step_section, "text_pipeline": text_pipeline_section,
                "graph_step": graph_step_section, "video_step": video_step_section,
                "video_pipeline": video_pipeline_section}
    for name, r in results.items():
        if "verdict" in r and not r["verdict"].startswith(("ERROR", "SKIPPED")):
            lines += sections[name](r) + [""]
    path.write_text("\n".join(lines))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--only", default=",".join(NAMES))
    parser.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                        help="auto: bf16 runs only where this CPU has native bf16 matmuls (see the module docstring)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.only.split(",") if n not in NAMES]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    start = time.perf_counter()
    note = common.set_threads(args.threads)  # decided once, so every benchmark runs with the same threads
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and not bf16_emulated())
    print(f"run_all: {note}; bf16 {'runs' if bf16 else 'emulated on this CPU: train_step fp32 only, visible_only skipped'}")
    results = run(args.only.split(","), args.quick, str(common.torch.get_num_threads()), bf16)
    path = write_readme(results, args.quick)
    print(f"\nall benchmarks: {time.perf_counter() - start:.0f} s; figures written to {path}")
    for name, r in results.items():
        print(f"  {name}: {r.get('verdict')}")


if __name__ == "__main__":
    main()
