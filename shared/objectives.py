"""Loss terms as modules, and the module that trains: `Pretraining(model, objective)`.

A recipe sums terms with weights:

    objective:
      pixel: {weight: 1.0, norm_pix: true}                 # single stream: the term reads it
      caption_mlm: {term: cross_entropy, stream: caption, weight: 0.5}

Generic terms: `pixel` (MAE), `cosine` (GraphMAE's scaled cosine error),
`cross_entropy` (masked LM on ids), `contrastive`
(InfoNCE between two streams, with its own projection heads and temperature).
A term is an `nn.Module` registered in OBJECTIVES, built as
`Term(stream=..., **options)`; `term(outputs, batch) -> scalar`. It may own
parameters (a projection head, an alignment), which are optimised and
checkpointed with the model, because `Pretraining` holds both. Reconstruction
terms average over the stream's target tokens only: hidden, decoded (when the
mask names a decode subset) and real (padding excluded), `Batch.target_weights`.
"""
from __future__ import annotations

import inspect
import math
import typing

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Bounds, _check_value as check_value
from .errors import ConfigError
from .model import Outputs, entered_positions, restore_stream
from .registry import OBJECTIVES
from .tokens import Batch


class Objective(nn.Module):
    """Base class of a loss term on one stream.

    A term that reads the model's own parts (a head's weights, chosen encoder layers) sets
    `reads_model = True` and is built with `model=`; `layers(options)` names the encoder
    layers whose hidden states it needs in Outputs (the model taps them). A term may also
    measure something beside its loss in `forward` (a contrastive term's retrieval accuracy),
    left in `measured`: logged with the losses, never optimised."""

    reads_model = False

    def __init__(self, stream: str):
        super().__init__()
        self.stream = stream
        self.measured: dict[str, Tensor] = {}

    @staticmethod
    def layers(options: dict) -> tuple[int, ...]:
        return ()

    def forward(self, outputs: Outputs, batch: Batch) -> Tensor:
        raise NotImplementedError


def weighted_mean(per_token: Tensor, weights: Tensor) -> Tensor:
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def normalise_per_token(target: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's norm_pix target: each token's values to zero mean, unit (unbiased) variance.
    Written out as mean, centre, sum of squares: the same numbers as `Tensor.var`, whose
    CPU kernel takes twice as long on a batch of 224px images (12 vs 6 ms)."""
    centred = target - target.mean(dim=-1, keepdim=True)
    var = centred.square().sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
    return centred * (var + eps).rsqrt()


def to_value_space(pred: Tensor, values: Tensor, norm_pix: bool) -> Tensor:
    """Map predictions back to token-value space (for pictures): undo norm_pix with the true token statistics."""
    if not norm_pix:
        return pred
    mean = values.mean(dim=-1, keepdim=True)
    var = values.var(dim=-1, keepdim=True, unbiased=True)
    return pred * (var + 1e-6).sqrt() + mean


@OBJECTIVES.register("pixel")
class PixelLoss(Objective):
    """Mean squared error on hidden tokens, optionally on per-token normalised targets (MAE)."""

    def __init__(self, stream: str, norm_pix: bool = True):
        super().__init__(stream)
        self.norm_pix = norm_pix

    def forward(self, outputs, batch):
        target = batch.streams[self.stream].values.float()
        if self.norm_pix:
            target = normalise_per_token(target)
        per_token = (outputs.pred(self.stream).float() - target).pow(2).mean(dim=-1)
        return weighted_mean(per_token, batch.target_weights(self.stream))


@OBJECTIVES.register("cosine")
class ScaledCosineError(Objective):
    """GraphMAE's scaled cosine error: the mean over target tokens of (1 - cos(pred, target))^alpha.
    alpha >= 1 down-weights targets already close (GraphMAE uses 1 to 3); unlike MSE it is
    blind to the features' scale, which for sparse or one-hot features is what a decoder
    would otherwise spend itself on."""

    def __init__(self, stream: str, alpha: float = 2.0):
        super().__init__(stream)
        if alpha < 1:
            raise ConfigError(f"objective cosine: alpha must be >= 1 (GraphMAE's scaling), got {alpha}")
        self.alpha = alpha

    def forward(self, outputs, batch):
        weights = batch.target_weights(self.stream)
        chosen = weights.bool()
        pred, target = outputs.pred(self.stream)[chosen].float(), batch.streams[self.stream].values[chosen].float()
        error = (1 - F.cosine_similarity(pred, target, dim=-1)).pow(self.alpha)
        return error.mean() if error.numel() else pred.sum() * 0.0


@OBJECTIVES.register("cross_entropy")
class TokenCrossEntropy(Objective):
    """Cross-entropy of the predicted logits against the true `ids` at target tokens
    (masked-LM; atom types). `label_smoothing` as torch's."""

    def __init__(self, stream: str, label_smoothing: float = 0.0):
        super().__init__(stream)
        self.label_smoothing = label_smoothing

    def forward(self, outputs, batch):
        out = outputs.streams[self.stream]
        ids = batch.streams[self.stream].ids
        if "rows" in out:  # the head predicted at the targets only
            return F.cross_entropy(out["pred"].float(), ids[out["rows"]], label_smoothing=self.label_smoothing)
        return token_cross_entropy(out["pred"], ids, batch.target_weights(self.stream), self.label_smoothing)

    def scored(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(the ids it scores [B, N], their weights): what a unigram baseline is measured on."""
        return batch.streams[self.stream].ids, batch.target_weights(self.stream)


def token_cross_entropy(logits: Tensor, ids: Tensor, weights: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over the tokens with weight 1 (only those are scored: a masked-LM
    head on 15% of tokens need not compute the softmax of the other 85%)."""
    chosen = weights.bool()
    if not bool(chosen.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[chosen].float(), ids[chosen], label_smoothing=label_smoothing)


def checked_options(term_class: type, options: dict, where: str) -> dict:
    """A term's options against what its constructor declares: an unknown one is refused with the
    allowed names, and a value of another type than the parameter's annotation with the key."""
    signature = inspect.signature(term_class.__init__)
    hints = typing.get_type_hints(term_class.__init__)
    allowed = [n for n, p in signature.parameters.items() if n not in ("self", "stream", "model")
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    for key, value in options.items():
        if key not in allowed and not takes_any:
            raise ConfigError(f"unknown config key '{where}.{key}'; allowed: weight, term, stream"
                              + "".join(f", {n}" for n in allowed))
        if key in hints:
            options[key] = check_value(value, hints[key], f"{where}.{key}")
    return options


class LossTerms(nn.Module):
    """The recipe's weighted terms; `forward(outputs, batch) -> (total, {name: value})`."""

    def __init__(self, terms: dict[str, dict], streams: list[str], model: nn.Module | None = None):
        super().__init__()
        if not terms:
            raise ConfigError("the objective has no terms; add one, e.g. objective.pixel.weight=1.0")
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, options in terms.items():
            options = dict(options)
            kind = options.pop("term", name)
            weight = options.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not Bounds(0.0).allows(weight):
                raise ConfigError(f"objective.{name}.weight must be a number >= 0 (a negative weight turns the "
                                  f"term into something to maximise); got {weight!r}")
            self.weights[name] = float(weight)
            stream = options.pop("stream", None)
            if stream is None:
                if len(streams) != 1:
                    raise ConfigError(f"objective.{name}.stream must name one of the streams {streams}")
                stream = streams[0]
            if stream not in streams:
                raise ConfigError(f"objective.{name}.stream {stream!r} is not one of the streams {streams}")
            try:
                term_class = OBJECTIVES.get(kind)
            except KeyError as error:
                raise ConfigError(f"objective.{name}: {error.args[0]}") from None
            options = checked_options(term_class, options, f"objective.{name}")
            if term_class.reads_model:
                options["model"] = model
            try:
                self.terms[name] = term_class(stream=stream, **options)
            except TypeError as error:
                raise ConfigError(f"objective.{name}: {error}") from None

    def forward(self, outputs: Outputs, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted sum, {term: its loss, "term/measure": what a term measured beside it})."""
        total, parts = None, {}
        for name, term in self.terms.items():
            value = term(outputs, batch)
            parts[name] = value.detach()
            parts.update({f"{name}/{key}": measure.detach() for key, measure in term.measured.items()})
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        return total, parts


class Pretraining(nn.Module):
    """The model and its loss terms as one module, so the trainer optimises, wraps
    (DDP/FSDP) and checkpoints both: `pretraining(batch) -> (loss, parts, outputs)`."""

    def __init__(self, model: nn.Module, objective: LossTerms):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor], Outputs]:
        outputs = self.model(batch)
        loss, parts = self.objective(outputs, batch)
        return loss, parts, outputs


def layers_read(terms: dict[str, dict]) -> tuple[int, ...]:
    """The encoder layers the recipe's terms read (`Objective.layers`), for the model to tap."""
    layers = set()
    for name, options in terms.items():
        kind = options.get("term", name)
        if kind in OBJECTIVES:
            layers.update(OBJECTIVES.get(kind).layers(options))
    return tuple(sorted(layers))


@OBJECTIVES.register("contrastive")
class StreamContrastive(Objective):
    """InfoNCE between two streams of the same samples (CLIP's symmetric loss, as CROMA
    aligns radar and optical and CrossVideoMAE clip and frame): each stream's encoder
    codes of the tokens it entered are mean-pooled, projected by a head of the term's own
    to `dim`, normalised, and matched across the batch; the temperature is learnt.

    The projection heads and the temperature are this term's parameters: `Pretraining`
    holds the term, so they are optimised and checkpointed with the model.

    `codes`: "latent", the encoder's output, or "unimodal", the codes of a model with an
    encoder per stream before it fuses them (CROMA aligns those: Outputs.unimodal).

    `shared_head`: one projection head for both streams, for two views of one stream (two
    streams reading the same payload with the same options, as SimCLR's two augmentations
    share one head); by default each stream has its own. Streams meant to be told apart only
    by this term should not attend each other (`model.streams_attend: apart`): in one joint
    sequence the pair could be matched through attention alone."""

    reads_model = True

    def __init__(self, stream: str, model: nn.Module, other: str, dim: int = 128, temperature: float = 0.07,
                 codes: str = "latent", shared_head: bool = False):
        super().__init__(stream)
        if other not in model.streams or other == stream:
            raise ConfigError(f"objective contrastive: other={other!r} must name another stream of {model.streams}")
        if codes not in ("latent", "unimodal"):
            raise ConfigError(f"objective contrastive: codes must be latent or unimodal; got {codes!r}")
        if codes == "unimodal" and not getattr(model, "separate_stream_encoders", False):
            raise ConfigError("objective contrastive: codes unimodal needs an encoder per stream (model.encoder: "
                              "croma); this model has one encoder for all streams")
        width = model.config.width
        self.other, self.prefix, self.codes = other, model.num_prefix, codes
        head = nn.Linear(width, dim)
        self.project = nn.ModuleDict({stream: head, other: head if shared_head else nn.Linear(width, dim)})
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def pooled(self, outputs: Outputs, batch: Batch, stream: str) -> Tensor:
        """Mean of the encoder's codes over the tokens of `stream` that it read."""
        latent = outputs.unimodal if self.codes == "unimodal" else outputs.latent
        codes = restore_stream(latent, self.prefix, batch, stream).float()
        entered = entered_positions(batch)
        if entered is None:  # every row read its first num_visible tokens in shuffle order
            entered = batch.mask.ids_restore < batch.mask.num_visible
        weights = entered[:, batch.layout[stream]].float()
        valid = batch.streams[stream].valid
        if valid is not None:
            weights = weights * valid.float()
        return (codes * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)

    def logits(self, outputs: Outputs, batch: Batch) -> Tensor:
        """[B, B]: scaled cosine similarity of sample i's `stream` and sample j's `other` embedding."""
        a = F.normalize(self.project[self.stream](self.pooled(outputs, batch, self.stream)), dim=-1)
        b = F.normalize(self.project[self.other](self.pooled(outputs, batch, self.other)), dim=-1)
        return self.log_scale.clamp(max=math.log(100)).exp() * a @ b.T

    def forward(self, outputs, batch):
        logits = self.logits(outputs, batch)
        targets = torch.arange(len(logits), device=logits.device)
        self.measured = {"retrieval_accuracy": self.top1(logits.detach())}
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    @staticmethod
    def top1(logits: Tensor) -> Tensor:
        """Top-1 retrieval of the paired stream within the batch, both ways averaged (chance: 1/B)."""
        targets = torch.arange(len(logits), device=logits.device)
        return ((logits.argmax(1) == targets).float().mean() + (logits.argmax(0) == targets).float().mean()) / 2

    def retrieval_accuracy(self, outputs: Outputs, batch: Batch) -> float:
        return float(self.top1(self.logits(outputs, batch)))
