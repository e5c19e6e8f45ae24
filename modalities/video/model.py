"""The video decoder: the shared transformer decoder, which with a running-cell decode subset
(`Mask.decode`, VideoMAE V2) reads only what VideoMAE V2's decoder reads.

The shared `TransformerDecoder` places a mask token at every hidden place and runs its blocks
over all N tokens; the loss then counts the decoded ones. VideoMAE V2's decoder instead takes
the visible tokens and mask tokens at the decoded places only, so a decoder mask of 50%
nearly halves the decoder's work. This class does that for one-stream batches: it gathers
[visible codes | mask tokens at the decoded places] (rows with fewer decoded places padded,
the padding masked out of attention), and scatters the predictions back to a [B, N, d]
tensor that holds zeros at every place not decoded. Without a decode subset, or in a batch of
several streams (CrossVideoMAE's clip and frame), it is the shared decoder exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from polymae.shared.kernels import linear
from polymae.shared.model import TransformerDecoder


class VideoDecoder(TransformerDecoder):
    def forward(self, latent: Tensor, prefix: int, batch, stream: str, taps: dict) -> dict:
        mask = batch.mask
        if mask.decode is None or len(batch.streams) != 1 or mask.keep_valid is not None or self.remask:
            return super().forward(latent, prefix, batch, stream, taps)
        return {"pred": self.decode_subset(latent, prefix, batch, stream)}

    def decode_subset(self, latent: Tensor, prefix: int, batch, stream: str) -> Tensor:
        mask, tokens = batch.mask, batch.streams[stream]
        x = linear(latent, self.embed, self.kernels)
        head, visible = x[:, :prefix], x[:, prefix:]                     # visible: ids_keep order
        b, n = mask.hidden.shape
        kept = mask.num_visible
        hidden_ids = mask.ids_shuffle[:, kept:]                          # the hidden tokens, per row
        decoded = torch.gather(mask.decode, 1, hidden_ids)
        counts = decoded.sum(1)
        most = int(counts.max()) if b else 0
        # the decoded hidden tokens first (stable: in shuffle order), then the rest as padding
        order = torch.argsort((~decoded).to(torch.uint8), dim=1, stable=True)[:, :most]
        targets = torch.gather(hidden_ids, 1, order)                     # [B, M] token indices
        coords = tokens.coords

        def place(ids: Tensor) -> Tensor:  # the decoder's position encoding of the tokens at `ids`
            return self.position(torch.gather(coords, 1, ids[..., None].expand(-1, -1, coords.shape[-1])))

        visible = visible + place(mask.ids_keep).to(x.dtype)
        queries = self.mask_token.to(x.dtype).expand(b, most, -1) + place(targets).to(x.dtype)
        x = torch.cat([head, visible, queries], dim=1)
        real = None
        if most and bool((counts < most).any()):
            real = torch.arange(most, device=x.device)[None, :] < counts[:, None]
            attn = torch.cat([real.new_ones(b, prefix + kept), real], 1)[:, None, None, :]
        else:
            attn = None
        for block in self.blocks:
            x = block(x, attn)
        rows = linear(self.norm(x[:, prefix + kept:]), self.head, self.kernels)   # [B, M, d]
        if real is not None:
            rows = rows * real[..., None].to(rows.dtype)
        pred = rows.new_zeros(b, n, rows.shape[-1])
        return pred.scatter(1, targets[..., None].expand(-1, -1, rows.shape[-1]), rows)
