"""The README's main job, `python demo.py`, runs end to end in a scratch copy of the repository:
demo corpus -> tiny codec -> tiny transformer -> a stereo completion WAV."""
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end(tmp_path):
    for name in ("config", "model", "data/demo", "demo.py", "train_codec.py", "train_transformer.py", "complete.py"):
        src, dst = REPO / name, tmp_path / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("train", "val", "manifest.json", "__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    done = subprocess.run([sys.executable, "demo.py", "--minutes", "1.5", "--codec-steps", "6",
                           "--transformer-steps", "6", "--seconds", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo finished" in done.stdout and "val mel distance" in done.stdout
    audio, sr = sf.read(tmp_path / "outputs/demo/completion.wav")
    assert sr == 16000 and audio.ndim == 2 and audio.shape[1] == 2 and len(audio) >= 2 * 16000
    assert (tmp_path / "checkpoints/codec/best.safetensors").is_file()
    assert (tmp_path / "checkpoints/transformer/best.safetensors").is_file()
