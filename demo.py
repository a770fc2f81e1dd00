"""The embedded default job: a tiny, CPU-only round trip through every part of hertz-dev.

    python demo.py [--out outputs/demo]

Builds the `tiny` codec and transformer (random weights), encodes a synthetic signal to latents,
quantizes them, runs the LM and the resynthesizer with their KV caches for a few steps,
decodes the generated latents and writes the result as a WAV.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

from config.codec_config import PRESETS as CODEC_PRESETS
from config.transformer_config import PRESETS as TRANSFORMER_PRESETS
from model import Codec, HertzDev, build, plex_codes, sample_latent, sample_token


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()

    codec = build(Codec, CODEC_PRESETS["tiny"]).eval()
    model = build(HertzDev, TRANSFORMER_PRESETS["tiny"]).eval()  # duplex
    sr = codec.config.sample_rate
    t = torch.arange(2 * sr) / sr
    prompt = torch.stack([0.3 * torch.sin(2 * np.pi * 220 * t * (1 + t)), 0.3 * torch.sin(2 * np.pi * 330 * t)])[:, None]

    with torch.no_grad():
        mu, logvar = codec.encode(prompt)                            # (2 channels, 16, 32)
        latents = torch.cat([mu[0], mu[1]], dim=-1)[None]           # (1, 16, 64): duplex latents
        _, indices = model.quantizer(mu)
        print(f"prompt: {prompt.shape[-1] / sr:.1f} s -> latents {tuple(latents.shape)}, "
              f"{len(indices.unique())} distinct FSQ codes")

        B, T = 1, latents.shape[1]
        lm_cache, rs_cache = model.lm.make_cache(B, T + args.steps), model.resynth.make_cache(B, T + args.steps)
        pos = torch.arange(T)[None]
        logits = model.lm(latents, lm_cache, pos)
        model.resynth(latents[:, :-1], tuple(p[:, :-1] for p in plex_codes(model.quantizer, latents, True)),
                      rs_cache, pos[:, :-1])
        last = latents[:, -1:]
        generated = []
        for step in range(args.steps):
            p = T - 1 + step
            tokens = [sample_token(l[:, -1], 0.8)[:, None] for l in logits]          # next code per channel
            plex = tuple(model.quantizer.indices_to_codes(tok) for tok in tokens)
            mixtures = model.resynth(last, plex, rs_cache, torch.tensor([[p]]))
            last = torch.cat([sample_latent(*m, 0.5, 0.1) for m in mixtures], dim=-1)  # (1, 1, 64)
            generated.append(last)
            logits = model.lm(last, lm_cache, torch.tensor([[p + 1]]))
        gen = torch.cat(generated, dim=1)
        audio = torch.cat([codec.decode(gen[..., :32]), codec.decode(gen[..., 32:])], dim=1)  # (1, 2, N)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import soundfile as sf
    sf.write(out / "roundtrip.wav", audio[0].T.numpy(), sr)
    print(f"generated {args.steps} latents ({audio.shape[-1] / sr:.1f} s, 2 channels) -> {out / 'roundtrip.wav'} "
          f"in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
