"""SparK ("Designing BERT for Convolutional Networks") for voxel patches.

A convnet cannot skip hidden patches the way a ViT drops tokens, and zeros in
their place would leak a mask pattern into every convolution. SparK treats
the visible patches as the active sites of a sparse tensor and encodes them
with sparse convolutions, which read and write active sites only, so hidden
patches never touch the encoder. Then, scale by scale, it densifies: empty
sites are filled with a learned mask embedding, and a light dense decoder
climbs the hierarchy back to the patch grid and predicts every patch's values.

    visible patches --Linear (the stem: a p^3 conv with stride p on the visible
      patches)--> active sites on the patch grid
      -> SubMConv3d blocks (scale 1) -> SparseConv3d k3 s2 -> SubMConv3d blocks (scale 2)
    densify both scales (mask embedding on empty sites)
      -> dense decoder: scale 2 -> upsample x2 -> + scale 1 -> Conv3d blocks -> 1x1 head
      -> pred [B, N, d_in] at every patch

It follows the model protocol (`model(batch) -> Outputs`, `features(batch)`)
and is built by `model.encoder: sparse_cnn` (the ENCODERS registry), so the
shared trainer, objectives and pipelines train it unchanged. Sizes come from ModelConfig: `width` channels
at scale 1 (2 x width at scale 2), `depth` SubM blocks split over the two
scales, `decoder_width` and `decoder_depth` for the dense decoder.

spconv 2.3.6 (spconv-cu120) runs on CPU only with ConvAlgo.Native; its
default algorithm is CUDA-only. The algorithm is chosen per forward from the
input's device; the weight layout is the same for every algorithm (KRSC:
[out, kx, ky, kz, in]). Biases are added outside spconv, whose fused eval-mode
bias kernel is CUDA-only. spconv has no bfloat16 kernels, so the model runs in
float32 inside an autocast region. Indices handed to spconv must be
row-major contiguous int32 (it reads raw memory: a transposed view, such as
`nonzero().int()`, silently pairs the wrong sites).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymae.shared.errors import ConfigError
from polymae.shared.model import ModelConfig, Outputs, gather_tokens
from polymae.shared.registry import ENCODERS
from polymae.shared.tokens import Batch, Mask


def import_spconv():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spconv 2.3.6 uses torch.cuda.amp decorators that torch deprecates
        import spconv.pytorch as spconv
        from spconv.pytorch.conv import SparseConvolution  # noqa: F401
    quiet_fx_tracing_notice()
    return spconv


def quiet_fx_tracing_notice() -> None:
    """spconv calls torch.fx's `is_fx_tracing`, which logs a once-per-process notice about
    torch.export meant for its own callers; emit that once here with the logger muted."""
    import logging

    from torch.fx import _symbolic_trace

    notice = getattr(_symbolic_trace, "is_fx_tracing_warning", None)
    if notice is None:
        return
    logger = logging.getLogger(_symbolic_trace.__name__)
    disabled, logger.disabled = logger.disabled, True
    try:
        notice()  # lru_cached: later calls are silent
    finally:
        logger.disabled = disabled


def conv_algo(device: torch.device):
    """ConvAlgo.Native on CPU (the only one spconv runs there), MaskImplicitGemm on CUDA."""
    from spconv.pytorch import ConvAlgo

    return ConvAlgo.Native if torch.device(device).type == "cpu" else ConvAlgo.MaskImplicitGemm


def sparse_tensor(features: Tensor, indices: Tensor, spatial_shape: tuple[int, ...], batch_size: int):
    """A spconv SparseConvTensor; indices [K, 1 + ndim] (batch, x, y, z), made contiguous int32."""
    spconv = import_spconv()
    return spconv.SparseConvTensor(features, indices.to(torch.int32).contiguous(), list(spatial_shape), batch_size)


def densify(features: Tensor, indices: Tensor, shape: tuple[int, ...], batch_size: int,
            fill: Tensor) -> tuple[Tensor, Tensor]:
    """Sparse features [K, C] at indices [K, 4] -> (dense [B, C, *shape] with `fill` [C] on empty sites,
    active [B, *shape] bool)."""
    c = features.shape[1]
    index = indices.long()
    sites = batch_size
    for size in shape:
        sites *= size
    linear = index[:, 0]
    for axis, size in enumerate(shape):
        linear = linear * size + index[:, axis + 1]
    active = torch.zeros(sites, dtype=torch.bool, device=features.device)
    active[linear] = True
    dense = fill.to(features.dtype).expand(sites, c).clone()
    dense = dense.index_put((linear,), features)
    dense = dense.view(batch_size, *shape, c).movedim(-1, 1).contiguous()
    return dense, active.view(batch_size, *shape)


class BiasedSparseConv(nn.Module):
    """A spconv convolution that picks its algorithm from the input's device, with its bias
    added outside it: in eval mode spconv fuses the bias into a kernel that is CUDA-only
    ("bias and act don't support cpu")."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        self.bias = nn.Parameter(torch.zeros(conv.out_channels))
        bound = 1 / math.sqrt(conv.in_channels * math.prod(conv.kernel_size))
        nn.init.uniform_(self.bias, -bound, bound)  # torch's Conv3d bias init

    def forward(self, x):
        algo = conv_algo(x.features.device)
        if self.conv.algo != algo:  # every conv of a forward agrees, as layers sharing an indice_key must
            self.conv.algo = algo
        x = self.conv(x)
        return x.replace_feature(x.features + self.bias)


def submanifold_conv(width_in: int, width_out: int, indice_key: str | None = None) -> BiasedSparseConv:
    spconv = import_spconv()
    return BiasedSparseConv(spconv.SubMConv3d(width_in, width_out, 3, padding=1, bias=False, indice_key=indice_key))


def strided_conv(width_in: int, width_out: int) -> BiasedSparseConv:
    """Kernel 3, stride 2, padding 1: active output sites where any input in the window is active."""
    spconv = import_spconv()
    return BiasedSparseConv(spconv.SparseConv3d(width_in, width_out, 3, stride=2, padding=1, bias=False))


class SubMBlock(nn.Module):
    """Pre-norm residual block on active sites: x + SubMConv3d(GELU(LayerNorm(x)))."""

    def __init__(self, width: int, indice_key: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = submanifold_conv(width, width, indice_key)

    def forward(self, x):
        h = self.conv(x.replace_feature(F.gelu(self.norm(x.features))))
        return h.replace_feature(x.features + h.features)  # SubM keeps the input's sites, in order


class DenseBlock(nn.Module):
    """x + Conv3d(GELU(GroupNorm(x))), the dense decoder's block."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, width)
        self.conv = nn.Conv3d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(F.gelu(self.norm(x)))


def coarse_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output size of a kernel-3, stride-2, padding-1 conv: ceil(n / 2) per axis."""
    return tuple((size + 1) // 2 for size in shape)


def upsample2(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Nearest x2 upsampling, cropped to `shape`: fine site i reads coarse site i // 2,
    the centre of the k3/s2/p1 window that covers it."""
    for axis in range(3):
        x = x.repeat_interleave(2, dim=2 + axis)
    return x[:, :, : shape[0], : shape[1], : shape[2]]


class SparseMaskedAutoencoder(nn.Module):
    def __init__(self, d_in: int, grid: tuple[int, int, int], config: ModelConfig = ModelConfig(),
                 stream: str = "voxel"):
        super().__init__()
        self.config = cfg = config.resolved()
        self.stream = stream
        self.d_in, self.grid = d_in, tuple(int(g) for g in grid)
        self.coarse_grid = coarse_shape(self.grid)
        width, wide, decoder = cfg.width, 2 * cfg.width, cfg.decoder_width
        depth1 = max(1, (cfg.depth + 1) // 2)
        depth2 = max(1, cfg.depth - depth1)
        self.embed = nn.Linear(d_in, width)
        self.stage1 = nn.ModuleList(SubMBlock(width, "scale1") for _ in range(depth1))
        self.norm1 = nn.LayerNorm(width)
        self.down = strided_conv(width, wide)
        self.stage2 = nn.ModuleList(SubMBlock(wide, "scale2") for _ in range(depth2))
        self.norm2 = nn.LayerNorm(wide)
        self.mask_token1 = nn.Parameter(torch.zeros(width))   # SparK's per-scale mask embeddings
        self.mask_token2 = nn.Parameter(torch.zeros(wide))
        self.proj2 = nn.Conv3d(wide, decoder, 1)
        self.decoder2 = DenseBlock(decoder)
        self.proj1 = nn.Conv3d(width, decoder, 1)
        self.decoder1 = nn.Sequential(*[DenseBlock(decoder) for _ in range(max(1, cfg.decoder_depth))])
        self.head = nn.Conv3d(decoder, d_in, 1)
        for token in (self.mask_token1, self.mask_token2):
            nn.init.normal_(token, std=0.02)

    # -- helpers ---------------------------------------------------------------
    def linear_index(self, coords: Tensor) -> Tensor:
        """(x, y, z) patch coords [..., 3] -> index into the x-slowest flattened patch grid."""
        c = coords.round().long()
        _, gy, gz = self.grid
        return (c[..., 0] * gy + c[..., 1]) * gz + c[..., 2]

    def check_coords(self, coords: Tensor) -> None:
        c = coords.round().long()
        bound = torch.tensor(self.grid, device=c.device)
        if bool(((c < 0) | (c >= bound)).any()):
            raise ValueError(f"patch coords outside the model's {self.grid} patch grid: set "
                             "modality_options.grid_size to the grids the model is trained on")

    def encode_sparse(self, values: Tensor, coords: Tensor, valid: Tensor | None):
        """Visible tokens [B, M, d_in] at coords [B, M, 3] -> (scale-1 and scale-2 sparse tensors)."""
        self.check_coords(coords)
        b, m, _ = values.shape
        batch_index = torch.arange(b, device=values.device).view(b, 1, 1).expand(b, m, 1)
        indices = torch.cat([batch_index, coords.round().long()], dim=-1).reshape(b * m, 4)
        features = self.embed(values).reshape(b * m, -1)
        if valid is not None:
            keep = valid.reshape(-1).bool()
            indices, features = indices[keep], features[keep]
        x = sparse_tensor(features, indices, self.grid, b)
        for block in self.stage1:
            x = block(x)
        x = x.replace_feature(self.norm1(x.features))
        y = self.down(x)
        for block in self.stage2:
            y = block(y)
        y = y.replace_feature(self.norm2(y.features))
        return x, y

    # -- the model protocol ------------------------------------------------------
    def forward(self, batch: Batch) -> Outputs:
        tokens = batch.tokens
        pred, latent = self.reconstruct(tokens.values, tokens.coords, batch.mask, tokens.valid)
        return Outputs({self.stream: {"pred": pred}}, latent)

    def features(self, batch: Batch) -> Tensor:
        tokens = batch.tokens
        return self.pooled_features(tokens.values, tokens.coords, tokens.valid)

    def reconstruct(self, values: Tensor, coords: Tensor, mask: Mask,
                    valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(pred [B, N, d_in] at every patch, scale-1 encodings of the visible patches)."""
        with torch.autocast(values.device.type, enabled=False):
            values = values.float()
            b = values.shape[0]
            ids_keep = mask.ids_keep
            visible_coords = gather_tokens(coords, ids_keep)
            visible_valid = None if valid is None else torch.gather(valid, 1, ids_keep)
            if mask.keep_valid is not None:
                visible_valid = mask.keep_valid if visible_valid is None else visible_valid & mask.keep_valid
            x, y = self.encode_sparse(gather_tokens(values, ids_keep), visible_coords, visible_valid)
            dense1, _ = densify(x.features, x.indices, self.grid, b, self.mask_token1)
            dense2, _ = densify(y.features, y.indices, self.coarse_grid, b, self.mask_token2)
            h = self.decoder2(self.proj2(dense2))
            h = self.decoder1(self.proj1(dense1) + upsample2(h, self.grid))
            out = self.head(h).flatten(2).transpose(1, 2)                  # [B, gx*gy*gz, d_in]
            pred = gather_tokens(out, self.linear_index(coords))          # in the tokens' order
            flat1 = dense1.flatten(2).transpose(1, 2)
            latent = gather_tokens(flat1, self.linear_index(visible_coords))  # scale-1 encodings of visible tokens
        return pred, latent

    def pooled_features(self, values: Tensor, coords: Tensor, valid: Tensor | None = None) -> Tensor:
        """One vector per sample: the mean scale-2 encoding with every patch visible (for probing)."""
        with torch.autocast(values.device.type, enabled=False):
            b = values.shape[0]
            _, y = self.encode_sparse(values.float(), coords, valid)
            batch = y.indices[:, 0].long()
            sums = torch.zeros(b, y.features.shape[1], device=values.device).index_add_(0, batch, y.features)
            counts = torch.bincount(batch, minlength=b).clamp_min(1).unsqueeze(1)
            return sums / counts


@ENCODERS.register("sparse_cnn")
def build_sparse_mae(modalities: dict, decoders: dict, config: ModelConfig, taps: tuple[int, ...] = ()):
    """`model.encoder: sparse_cnn`: SparK's sparse CNN and dense decoder on one voxel stream."""
    if len(modalities) != 1 or next(iter(modalities.values())).name != "voxel":
        raise ConfigError("model.encoder=sparse_cnn encodes one voxel stream; this recipe's streams are "
                          f"{ {name: m.name for name, m in modalities.items()} }")
    if taps:
        raise ConfigError("model.encoder=sparse_cnn has no transformer layers for heads or objectives to read")
    if config.encoder_options:
        raise ConfigError(f"model.encoder_options {sorted(config.encoder_options)}: the sparse_cnn encoder takes none "
                          "(its sizes are model.width, depth, decoder_width, decoder_depth)")
    (stream, modality), = modalities.items()
    return SparseMaskedAutoencoder(modality.d_in, modality.grid, config, stream)
