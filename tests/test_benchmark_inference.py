"""benchmarks/inference.py on the CPU with the tiny preset: every weight mode and KV dtype side by
side in one run (the GPU run's code path, short), with the packages the GPU image lacks made
unimportable."""
import json
import os
import subprocess
import sys
from pathlib import Path

from test_benchmark_server import NOT_ON_GPU_IMAGE

REPO = Path(__file__).resolve().parents[1]


def test_inference_benchmark_modes_side_by_side(tmp_path):
    for name in NOT_ON_GPU_IMAGE:
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/inference.py", "--device", "cpu", "--sizes", "tiny",
                        "--quantize", "none,int8,int4", "--kv-dtype", "auto,fp8", "--steps", "2", "--batches", "1,2",
                        "--gen-seconds", "0.5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert lines[-1]["bench"] == "done"
    modes = [(q, kv) for q in ("none", "int8", "int4") for kv in ("auto", "fp8")]
    by = {}
    for line in lines:
        if "quantize" in line:
            by.setdefault((line["quantize"], line["kv_dtype"]), {}).setdefault(line["bench"], []).append(line)
    assert list(by) == modes  # in order: one mode after another
    for mode, b in by.items():
        assert sorted(line["batch"] for line in b["live_step"]) == [1, 2], mode
        assert all(line["p50_ms"] > 0 and "error" not in line for line in b["live_step"]), mode
        assert b["mono_completion"][0]["latents_per_s"] > 0 and b["mono_completion"][0]["latents"] == 4
    weights = {q: by[(q, "auto")]["weights"][0]["transformer_bytes"] for q in ("none", "int8", "int4")}
    # float32 on the CPU: int8 is about a quarter; the tiny model's layers are mostly too narrow for int4
    assert weights["int4"] <= weights["int8"] < weights["none"] / 3
    kv = {k: by[("none", k)]["peak_memory"][0]["kv_bytes"] for k in ("auto", "fp8")}
    assert kv["fp8"] * 4 == kv["auto"]  # float32 on the CPU
    bad = subprocess.run([sys.executable, "benchmarks/inference.py", "--quantize", "int3"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: --quantize: unknown mode 'int3'" in bad.stderr


def test_inference_benchmark_names_the_modes_its_budget_leaves_out():
    r = subprocess.run([sys.executable, "benchmarks/inference.py", "--device", "cpu", "--sizes", "tiny",
                        "--quantize", "none,int8", "--budget-s", "0"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    skipped = [(line["quantize"], line["kv_dtype"]) for line in lines if line["bench"] == "skipped"]
    assert skipped == [("none", "auto"), ("int8", "auto")] and lines[-1]["bench"] == "done"
    assert not any(line["bench"] == "live_step" for line in lines)


def test_gpu_benchmarks_without_a_gpu_are_one_error_line_and_all_take_help():
    """The GPU-only benchmarks on a machine without CUDA ended in a traceback (`Torch not compiled
    with CUDA enabled`), and two took no flags at all (`l2_prefetch.py --help` ran the benchmark,
    6.5 GB of weights, on a GPU). Now each is one `error:` line naming itself, exit status 1, and
    all read their flags through config.ArgumentParser. Every script in one process (runpy, as
    `python benchmarks/X.py` runs it): one torch import for all."""
    scripts = ["inference", "quant_kernels", "glue_probe", "int8_gemv_probe", "conv_layouts", "snake_kernel",
               "l2_prefetch"]
    code = ("import contextlib, io, json, runpy, sys\nout = {}\n"
            "for name in sys.argv[1:]:\n"
            "    for flags in ([], ['--help'], ['--bogus']):\n"
            "        sys.argv, err, std = [f'benchmarks/{name}.py', *flags], io.StringIO(), io.StringIO()\n"
            "        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):\n"
            "            try:\n"
            "                runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "                code = 0\n"
            "            except SystemExit as e:\n"
            "                code = e.code if isinstance(e.code, int) else (print(e.code, file=err) or 1)\n"
            "        out[f'{name} {flags}'] = [code, err.getvalue(), std.getvalue()[:40]]\n"
            "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, *scripts], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    for name in scripts:
        code, err, _ = out[f"{name} []"]
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "CUDA" in err, (name, code, err)
        assert "Traceback" not in err
        code, _, std = out[f"{name} ['--help']"]
        assert code == 0 and std.startswith(f"usage: {name}.py"), (name, code, std)
        code, err, _ = out[f"{name} ['--bogus']"]
        assert code == 2 and err == f"error: unrecognized arguments: --bogus ({name}.py --help lists the flags)\n", (name, err)
