"""The version-2 data model on real data: several streams per sample, variable token
counts, one Mask over the concatenated streams (per-stream exact counts, MultiMAE's
shared Dirichlet budget, a decode subset), edges batched by offsets, and a modality
added as one folder plus one entry-point line, trained without installing anything."""
from __future__ import annotations

from collections import Counter

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from polymae.shared.masking import RandomMasker, split_visible_budget
from polymae.shared.tokens import Batch, Mask, Tokens, collate, joint_mask


def digit_tokens(count: int, lengths: list[int]) -> list[Tokens]:
    """Real digits' pixels as 1-D sequences of 4-pixel tokens, cut to the given lengths."""
    images = load_digits().images[:count].reshape(count, 16, 4).astype(np.float32)
    return [Tokens(values=torch.from_numpy(images[i, :n].copy())) for i, n in enumerate(lengths)]


def test_streams_of_different_lengths_pad_and_join_into_one_mask():
    lengths_a, lengths_b = [16, 9, 12], [5, 7, 3]
    a, b = digit_tokens(3, lengths_a), digit_tokens(3, lengths_b)
    masker = RandomMasker(0.5)
    items = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        items.append(({"a": a[i], "b": b[i]}, {"a": masker(a[i], g), "b": masker(b[i], g)}, i % 2, f"k{i}"))
    batch = collate(items)
    assert batch.layout == {"a": slice(0, 16), "b": slice(16, 23)}
    assert batch.streams["a"].values.shape == (3, 16, 4) and batch.streams["b"].values.shape == (3, 7, 4)
    for name, lengths in (("a", lengths_a), ("b", lengths_b)):
        valid = batch.streams[name].valid
        assert valid.sum(1).tolist() == lengths
        hidden, _ = batch.stream_mask(name)
        assert hidden.sum(1).tolist() == [round(0.5 * n) if round(0.5 * n) < n else n - 1 for n in lengths]
        assert not (hidden & ~valid).any()
        # the padded values are zeros and the real ones are each sample's own
        for i, n in enumerate(lengths):
            assert torch.equal(batch.streams[name].values[i, :n], (a if name == "a" else b)[i].values)
    visible = [n_a - round(0.5 * n_a) + n_b - round(0.5 * n_b) for n_a, n_b in zip(lengths_a, lengths_b)]
    assert batch.mask.num_visible == max(visible)
    assert batch.mask.keep_valid.sum(1).tolist() == visible
    # the real encoder inputs are exactly the visible, real tokens of both streams
    full_valid = torch.cat([batch.streams["a"].valid, batch.streams["b"].valid], 1)
    for i in range(3):
        kept = batch.mask.ids_keep[i][batch.mask.keep_valid[i]]
        expected = (full_valid[i] & ~batch.mask.hidden[i]).nonzero().flatten()
        assert sorted(kept.tolist()) == expected.tolist()
    restored = torch.gather(batch.mask.ids_shuffle, 1, batch.mask.ids_restore)
    assert torch.equal(restored, torch.arange(23).expand(3, 23))
    assert batch.labels.tolist() == [0, 1, 0]


def test_a_single_unpadded_stream_keeps_the_maskers_own_mask():
    tokens = digit_tokens(1, [16])[0]
    mask = RandomMasker(0.75)(tokens, torch.Generator().manual_seed(3))
    assert joint_mask([mask], [16], [16]) is mask
    batch = collate([({"image": tokens}, {"image": mask}, None, "x")])
    assert batch.mask.keep_valid is None and batch.mask.num_visible == 4


def test_a_tokenizers_own_padding_is_never_visible_nor_hidden():
    tokens = digit_tokens(1, [16])[0]
    tokens.valid = torch.arange(16) < 10
    for seed in range(20):
        mask = RandomMasker(0.5)(tokens, torch.Generator().manual_seed(seed))
        assert int(mask.hidden.sum()) == 5 and mask.num_visible == 5
        assert not mask.hidden[10:].any() and (mask.ids_keep < 10).all()


@pytest.mark.parametrize("alpha", [0.2, 1.0, 50.0])
def test_the_dirichlet_budget_is_exact_and_spread_as_alpha_says(alpha):
    shares = []
    for seed in range(300):
        hide = split_visible_budget([196, 32, 16], 60, alpha, torch.Generator().manual_seed(seed))
        shown = [n - h for n, h in zip([196, 32, 16], hide)]
        assert sum(shown) == 60 and all(0 <= s <= n for s, n in zip(shown, [196, 32, 16]))
        shares.append(shown[0] / 60)
    spread = float(np.std(shares))
    if alpha == 50.0:
        assert spread < 0.08        # near an even split (capped streams push the rest to the big one)
    if alpha == 0.2:
        assert spread > 0.25        # most samples give most of the budget to one stream
    with pytest.raises(ValueError, match="does not fit"):
        split_visible_budget([3, 2], 6, 1.0, torch.Generator())


def test_sampling_which_streams_are_shown_draws_every_subset_alike():
    """MultiMAE's sample_tasks_uniformly: each non-empty subset of the streams with tokens is shown
    about as often (7 of 3 streams), the others show nothing, and the budget stays exact where the
    chosen streams hold it (all they hold where they do not)."""
    sizes = [196, 32, 16]
    subsets = Counter()
    for seed in range(2800):
        hide = split_visible_budget(sizes, 60, 1.0, torch.Generator().manual_seed(seed), sample_streams=True)
        shown = [n - h for n, h in zip(sizes, hide)]
        chosen = tuple(i for i, s in enumerate(shown) if s > 0)
        capacity = sum(sizes[i] for i in chosen)
        assert sum(shown) == min(60, capacity) and all(0 <= s <= n for s, n in zip(shown, sizes))
        subsets[chosen] += 1
    assert len(subsets) == 7 and min(subsets.values()) > 0.8 * 400 and max(subsets.values()) < 1.2 * 400, subsets
    hide = split_visible_budget([0, 20, 20], 10, 1.0, torch.Generator().manual_seed(1), sample_streams=True)
    assert hide[0] == 0 and sum(20 - h for h in hide[1:]) == 10   # a stream with no tokens is never the one shown
    # without it, the split is what it always was: the same numbers from the same generator
    assert split_visible_budget(sizes, 60, 1.0, torch.Generator().manual_seed(5)) == \
        split_visible_budget(sizes, 60, 1.0, torch.Generator().manual_seed(5), sample_streams=False)


def test_the_shared_budget_reaches_the_batch_through_the_stream(tmp_path):
    from polymae.pipelines.shards import write_shards
    from polymae.pipelines.stream import Loader, ShardStream, StreamSpec
    from polymae.shared.registry import MODALITIES

    import polymae.modalities  # noqa: F401

    digits = load_digits()
    from polymae.modalities.image.adapters import encode_png
    samples = [{"__key__": f"d{i}", "png": encode_png(np.round(digits.images[i] * 255 / 16).astype(np.uint8)),
                "cls": str(int(digits.target[i])).encode()} for i in range(64)]
    write_shards(samples, tmp_path, "train")
    image = MODALITIES.get("image")({"image_size": [8, 8], "patch_size": 2, "channels": 1}, payload_keys=("png",))
    specs = [StreamSpec("left", image, RandomMasker(0.5)), StreamSpec("right", image, RandomMasker(0.5))]
    stream = ShardStream([str(p) for p in tmp_path.glob("train-*.tar")], specs, batch_size=16, train=False,
                         visible_budget=10, budget_alpha=1.0)
    batch = next(iter(Loader(stream, 0)))
    visible = (~batch.mask.hidden).sum(1)
    assert visible.tolist() == [10] * 16                        # 10 visible tokens per sample, split two ways
    left = (~batch.stream_mask("left")[0]).sum(1)
    assert len(set(left.tolist())) > 3                           # the split differs from sample to sample
    stream = ShardStream([str(p) for p in tmp_path.glob("train-*.tar")], specs, batch_size=64, train=False,
                         visible_budget=10, budget_alpha=1.0, budget_sample_streams=True)
    batch = next(iter(Loader(stream, 0)))
    assert (~batch.mask.hidden).sum(1).tolist() == [10] * 64
    shown = torch.stack([(~batch.stream_mask(name)[0]).sum(1) for name in ("left", "right")], 1)
    alone = (shown == 0).any(1)
    assert 0.15 < float(alone.float().mean()) < 0.9                 # 2 of the 3 subsets show one stream only
    assert (shown[alone].max(1).values == 10).all()                 # which then shows the whole budget


def test_a_decode_subset_limits_the_targets():
    tokens = digit_tokens(2, [16, 16])
    masks = []
    for i, t in enumerate(tokens):
        mask = RandomMasker(0.75)(t, torch.Generator().manual_seed(i))
        decode = mask.hidden.clone()
        decode[decode.nonzero().flatten()[::2]] = False          # the decoder rebuilds half of the hidden tokens
        mask.decode = decode
        masks.append(mask)
    batch = collate([({"s": t}, {"s": m}, None, str(i)) for i, (t, m) in enumerate(zip(tokens, masks))])
    weights = batch.target_weights("s")
    assert weights.sum(1).tolist() == [6, 6]
    assert torch.equal(weights.bool(), batch.mask.hidden & batch.mask.decode)


def test_edges_batch_by_offsets_into_the_padded_layout():
    a = Tokens(values=torch.zeros(3, 2), edges=torch.tensor([[0, 1], [1, 2]]), edge_fields={"w": torch.ones(2)})
    b = Tokens(values=torch.zeros(5, 2), edges=torch.tensor([[4, 0, 2], [3, 1, 0]]),
               edge_fields={"w": torch.full((3,), 2.0)})
    masks = [RandomMasker(0.0)(t, torch.Generator()) for t in (a, b)]
    batch = collate([({"g": a}, {"g": masks[0]}, None, "a"), ({"g": b}, {"g": masks[1]}, None, "b")])
    graph = batch.streams["g"]
    assert graph.edges.tolist() == [[0, 1, 9, 5, 7], [1, 2, 8, 6, 5]]   # sample b's token i is 5 + i
    assert graph.edge_fields["w"].tolist() == [1, 1, 2, 2, 2]
    flat_valid = graph.valid.flatten()
    assert flat_valid[graph.edges].all()                                 # no edge touches padding


PLUGIN = '''
"""A throwaway modality: real handwritten digits read as 1-D signals of 64 samples."""
import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from polymae.shared.modality import Modality
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens


@dataclass
class SignalOptions:
    patch: int = 4


@MODALITIES.register("signal")
class Signal(Modality):
    name = "signal"
    payload_keys = ("npy",)
    Options = SignalOptions

    def sources(self):
        return {"digits": "scikit-learn's digits as 64-sample signals"}

    def read_source(self, source, **kwargs):
        from sklearn.datasets import load_digits
        digits = load_digits()
        for i, row in enumerate(digits.data[:400]):
            buffer = io.BytesIO()
            np.save(buffer, row.astype(np.float32) / 16)
            yield {"__key__": f"s{i:04d}", "npy": buffer.getvalue(), "cls": str(int(digits.target[i])).encode()}

    def decode(self, sample):
        return np.load(io.BytesIO(self.payload(sample)[1]))

    def tokenize(self, payload, generator, train=True):
        return Tokens(values=torch.from_numpy(payload).view(-1, self.options.patch))

    @property
    def d_in(self):
        return self.options.patch

    @property
    def num_coords(self):
        return 1

    def render(self, tokens, hidden, pred, rows=8):
        return Image.new("RGB", (8, 8), "white")
'''


def test_a_modality_is_one_folder_and_one_entry_point_line(tmp_path):
    """Nothing is installed: the folder and a dist-info with the entry point sit on PYTHONPATH,
    as pip would leave them, and `polymae` finds, shards and trains the new modality."""
    package = tmp_path / "site" / "signal_modality"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "site" / "signal_modality-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: signal-modality\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[polymae.modalities]\nsignal = signal_modality\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    listed = subprocess.run([sys.executable, "-m", "polymae.pipelines.cli", "info"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert listed.returncode == 0 and "signal" in listed.stdout.split("modalities:")[1].splitlines()[0]
    recipe = tmp_path / "signal.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: signal
        modality: signal
        data: {{source: digits, shards: {tmp_path}/shards, val_fraction: 0.2, batch_size: 32, num_workers: 0}}
        model: {{width: 48, depth: 2, heads: 2, decoder_width: 32, decoder_depth: 1, decoder_heads: 2}}
        objective: {{pixel: {{norm_pix: false}}}}
        trainer: {{max_steps: 6, log_every: 2}}
        probe: {{max_samples: 200}}
        out_dir: {tmp_path}/runs
        """))
    result = subprocess.run([sys.executable, "-m", "polymae.pipelines.cli", "pretrain", str(recipe)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "signal" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["probe"]["pretrained"]["val_samples"] > 50


def test_the_model_protocol_reads_a_batch_and_pools_real_tokens_only():
    import polymae.modalities  # noqa: F401
    from polymae.shared.model import DecoderConfig, ModelConfig, build_model
    from polymae.shared.registry import MODALITIES

    image = MODALITIES.get("image")({"image_size": [8, 8], "patch_size": 2, "channels": 1})
    torch.manual_seed(0)
    model = build_model({"image": image}, {"image": DecoderConfig()},
                        ModelConfig(width=48, depth=2, heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2))
    tokens = digit_tokens(4, [16] * 4)
    for t in tokens:
        t.coords, t.grid = image.tokenize(torch.zeros(1, 8, 8, dtype=torch.uint8), torch.Generator(), False).coords, (4, 4)
    masks = [RandomMasker(0.75)(t, torch.Generator().manual_seed(i)) for i, t in enumerate(tokens)]
    batch: Batch = collate([({"image": t}, {"image": m}, None, str(i)) for i, (t, m) in enumerate(zip(tokens, masks))])
    outputs = model(batch)
    assert outputs.pred("image").shape == (4, 16, 4) and outputs.latent.shape == (4, 1 + 4, 48)
    assert model.features(batch).shape == (4, 48)
    assert isinstance(batch.mask, Mask)
