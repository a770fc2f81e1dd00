"""hertz-dev: codec, latent quantizer, latent LM and resynthesizer, exact with the official weights.

Public API:
    load_codec(source="official" | path, device=..., dtype=...)
    load_hertz_dev(source="duplex" | "mono" | "mono-pure-audio" | path, device=..., dtype=..., codec="auto")
    save_codec(path, codec), save_transformer(path, model, codec_source)
    Generator(model, batch_size).complete(audio, steps, params, seed)      completions
    LiveEngine(model, max_sessions).reset(row, ...) / .step(user_chunks)   live duplex

`model.protocol` (the live protocol and parameter ranges) imports only numpy: the names below are
imported lazily, so `import model.protocol` works where torch is not installed (the clients).
"""
import importlib

_EXPORTS = {
    "Codec": "codec", "CodecStream": "codec",
    "Generator": "generator", "LiveEngine": "live",
    "LatentLM": "lm",
    "HertzDev": "loading", "build": "loading", "load_codec": "loading", "load_hertz_dev": "loading",
    "save_codec": "loading", "save_transformer": "loading",
    "LatentQuantizer": "quantizer",
    "quantize_model": "quant", "weight_bytes": "quant",
    "Resynthesizer": "resynth", "mixture_nll": "resynth", "plex_codes": "resynth",
    "SamplingParams": "sampling", "row_seed": "sampling",
    "StreamCodec": "stream_codec", "decode_frames": "stream_codec", "encode_frames": "stream_codec",
    "KVCache": "transformer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
