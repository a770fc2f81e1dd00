"""The streaming interface of `model.stream_codec.StreamCodec` over the module codec itself (cuDNN
convolutions, `CodecStream` state with row gating): a second implementation the live engine's
output must equal."""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from model.codec import Codec, CodecStream


def inference_codec(codec: Codec) -> Codec:
    """A copy of the codec with its weight norm folded into plain weights (the same function,
    fewer kernels per step). The given codec is left as it is (a deep copy of a parametrized
    module cannot be unparametrized safely: the copies share their generated classes)."""
    from model.loading import build

    p = next(codec.parameters())
    folded = build(Codec, dataclasses.replace(codec.config, weight_norm=False), p.device, p.dtype, init=False)
    state = {k: v for k, v in codec.state_dict().items() if ".parametrizations." not in k}
    with torch.no_grad():
        for name, m in codec.named_modules():
            if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
                state[f"{name}.weight"] = m.weight.detach().clone()
    folded.load_state_dict(state, strict=True)
    return folded.eval().requires_grad_(False)


class GatedStream(CodecStream):
    """A CodecStream whose rows advance only where `active` (B, 1, 1) is set: the streaming
    state of inactive rows is left untouched (`CodecStream.push`, with a row mask)."""

    def __init__(self, stack, batch_size: int, device, dtype, active: Optional[Tensor] = None):
        super().__init__(stack, batch_size, device, dtype)
        self.active = active if active is not None else torch.ones(batch_size, 1, 1, dtype=torch.bool, device=device)

    def push(self, module, x: Tensor) -> Tensor:
        buf = self.buffers[id(module)]
        if id(module) in self.fresh:
            fresh = self.fresh[id(module)]
            buf.copy_(torch.where(fresh & self.active, x[..., :1].expand_as(buf), buf))
            fresh.logical_and_(~self.active)
        full = torch.cat([buf, x], dim=-1)
        torch.where(self.active, full[..., full.shape[-1] - buf.shape[-1]:], buf, out=buf)
        return full

    def row(self, r: int) -> "GatedStream":
        """Row `r` alone (views: writes land here), always active."""
        view = copy.copy(self)
        view.batch_size = 1
        view.buffers = {k: b[r:r + 1] for k, b in self.buffers.items()}
        view.fresh = {k: f[r:r + 1] for k, f in self.fresh.items()}
        view.active = torch.ones(1, 1, 1, dtype=torch.bool, device=self.active.device)
        return view


class ConvStreamCodec:
    """The streaming interface of `StreamCodec` over the module codec itself (cuDNN convolutions,
    `CodecStream` state with row gating): the reference for StreamCodec, and its alternative."""

    def __init__(self, codec: Codec):
        self.codec = inference_codec(codec)
        self.hop_length = codec.hop_length
        p = next(self.codec.parameters())
        self.device, self.dtype = p.device, p.dtype

    def init_state(self, batch_size: int, active: Optional[Tensor] = None) -> tuple[GatedStream, GatedStream]:
        return tuple(GatedStream(half, batch_size, self.device, self.dtype, active)
                     for half in (self.codec.encoder, self.codec.decoder))

    def encode(self, audio: Tensor, state: GatedStream) -> tuple[Tensor, Tensor]:
        return self.codec.encode(audio[:, None].to(self.dtype), state)

    def decode(self, latents: Tensor, state: GatedStream) -> Tensor:
        return self.codec.decode(latents.to(self.dtype), state)[:, 0]
