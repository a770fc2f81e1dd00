"""hertz-dev: codec, latent quantizer, latent LM and resynthesizer, exact with the official weights.

Public API:
    load_codec(source="official" | path, device=..., dtype=...)
    load_hertz_dev(source="duplex" | "mono" | "mono-pure-audio" | path, device=..., dtype=..., codec="auto")
    save_codec(path, codec), save_transformer(path, model, codec_source)
    Generator(model, batch_size).complete(audio, steps, params, seed)      completions
    LiveEngine(model, max_sessions).reset(row, ...) / .step(user_chunks)   live duplex
"""
from .codec import Codec, CodecStream
from .generate import Generator, LiveEngine, generate_uncached
from .lm import LatentLM
from .loading import HertzDev, build, load_codec, load_hertz_dev, save_codec, save_transformer
from .quantizer import LatentQuantizer
from .resynth import Resynthesizer, mixture_nll, plex_codes
from .sampling import SamplingParams, sample_latent, sample_token
from .stream_codec import StreamCodec
from .transformer import KVCache

__all__ = ["Codec", "CodecStream", "LatentLM", "HertzDev", "build", "load_codec", "load_hertz_dev", "save_codec",
           "save_transformer", "LatentQuantizer", "Resynthesizer", "mixture_nll", "plex_codes", "SamplingParams",
           "sample_latent", "sample_token", "KVCache", "Generator", "LiveEngine", "generate_uncached", "StreamCodec"]
