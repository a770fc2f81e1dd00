"""`model.cuda_graphs.GraphedPass` (the codec trainer's `cuda_graph=true`): a training pass replayed
from a CUDA graph gives what the same pass gives eagerly — its losses, the gradients it adds, a
new kind of call's own graph — and the trainer with it follows the eager trainer's losses.
CUDA only (CUDA graphs); on the CPU `cuda_graph` changes nothing (the pass runs eagerly)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.cuda_graphs import GraphedPass

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graphs)")


def model_and_pass(seed=0):
    """A conv + linear model on CUDA, and its pass: forward, loss, backward adding into `.grad`."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 8, 5, padding=2), torch.nn.ELU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(3)).cuda()
    model(torch.zeros(1, 2, 16, device="cuda"))  # (the lazy layer's shape)

    def train_pass(scale: float, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = scale * torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return {"loss": loss.detach(), "first": model[0].weight.grad[0, 0, 0].detach()}
    return model, train_pass


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@cuda
def test_a_replayed_pass_gives_the_eager_pass_losses_and_gradients():
    eager_model, eager_pass = model_and_pass()
    graphed_model, graphed_pass = model_and_pass()
    run = GraphedPass(graphed_pass, list(graphed_model.parameters()), enabled=True, warmup=2)
    g = torch.Generator(device="cuda").manual_seed(1)
    for call in range(6):  # 2 eager warm-ups, the capture, 3 replays; gradients zeroed in place between
        x, y = torch.randn(4, 2, 16, device="cuda", generator=g), torch.randn(4, 3, device="cuda", generator=g)
        want, got = eager_pass(0.5, x, y), run(0.5, x, y)
        assert torch.allclose(got["loss"], want["loss"], rtol=1e-5), call
        for a, b in zip(grads(graphed_model), grads(eager_model)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), call
        # the values handed back are the caller's: the next replay does not change them
        kept = got["loss"].clone()
        for model in (eager_model, graphed_model):
            model.zero_grad(set_to_none=False)
        if call >= 2:
            assert run.graph is not None
            run(0.5, x + 1, y)
            assert torch.equal(got["loss"], kept)
            graphed_model.zero_grad(set_to_none=False)


@cuda
def test_replays_add_into_the_gradients_and_a_new_kind_of_call_gets_its_own_graph():
    eager_model, eager_pass = model_and_pass()
    graphed_model, graphed_pass = model_and_pass()
    run = GraphedPass(graphed_pass, list(graphed_model.parameters()), enabled=True, warmup=1)
    x, y = torch.randn(4, 2, 16, device="cuda"), torch.randn(4, 3, device="cuda")
    run(1.0, x, y)  # warm-up
    graphed_model.zero_grad(set_to_none=False)
    run(1.0, x, y)  # capture and replay
    run(1.0, 2 * x, y)  # accumulates, as eager micro-batches do
    eager_pass(1.0, x, y)
    eager_pass(1.0, 2 * x, y)
    for a, b in zip(grads(graphed_model), grads(eager_model)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    first = run.graph
    for model in (eager_model, graphed_model):
        model.zero_grad(set_to_none=False)
    for scale in (2.0, 2.0, 2.0):  # another non-tensor argument: its own warm-up, then its own graph
        got, want = run(scale, x[:2], y[:2]), eager_pass(scale, x[:2], y[:2])
        assert torch.allclose(got["loss"], want["loss"], rtol=1e-5)
    assert run.graph is not None and run.graph is not first
    for a, b in zip(grads(graphed_model), grads(eager_model)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@cuda
def test_a_pass_that_cannot_be_captured_is_a_warning_and_runs_eagerly_from_then_on():
    """A capture that fails (here: the pass reads a value on the host, which a graph cannot hold)
    ended the training run with a traceback; it is now a RuntimeWarning and the passes run eagerly,
    their gradients those of the eager pass (a capture computes nothing)."""
    eager_model, eager_pass = model_and_pass()
    graphed_model, graphed_pass = model_and_pass()

    def syncing(scale, x, y):
        out = graphed_pass(scale, x, y)
        float(out["loss"])  # a host sync: not allowed under capture
        return out
    run = GraphedPass(syncing, list(graphed_model.parameters()), enabled=True, warmup=1)
    x, y = torch.randn(4, 2, 16, device="cuda"), torch.randn(4, 3, device="cuda")
    stream = torch.cuda.current_stream()
    run(1.0, x, y)
    eager_pass(1.0, x, y)
    rng = torch.cuda.get_rng_state()
    with pytest.warns(RuntimeWarning) as caught:
        got = run(1.0, x, y)
    # one line: CUDA's error comes with lines of advice (CUDA_LAUNCH_BLOCKING, ...), which a regex's
    # `.*` does not cross (this test failed on an H100 in session 36, its output not kept: the
    # likeliest cause)
    [said] = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert said.startswith("the training pass could not be captured in a CUDA graph (") and \
        said.endswith("; this run goes on eagerly") and "\n" not in said, said
    assert torch.cuda.current_stream() == stream  # the capture's stream is not left current
    # the random generator is usable after it and where it was: the eager passes from then on draw
    # their noise (the codec's latent sampling) as before (session 37, on an H100: the failed
    # capture left the generator marked capturing, and the next test's first draw on CUDA failed)
    drawn = torch.randn(1000, device="cuda")
    torch.cuda.set_rng_state(rng)
    assert torch.equal(drawn, torch.randn(1000, device="cuda"))
    want = eager_pass(1.0, x, y)
    assert not run.enabled and torch.allclose(got["loss"], want["loss"], rtol=1e-5)
    for a, b in zip(grads(graphed_model), grads(eager_model)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@cuda
def test_the_codec_trainer_with_cuda_graph_follows_the_eager_trainer(tmp_path):
    """`train_codec.py --config tiny` on CUDA in float32, 12 steps with the discriminators from step
    5 (so both of the trainer's passes are graphed), with and without `cuda_graph`: the same losses
    step by step, up to the order of float32 sums (cuDNN may pick other algorithms in a capture),
    and the random draws of the posterior's sampling continue the same stream."""
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(ROOT / "data" / "demo" / "prepare.py"), "--minutes", "0.5", "--seed", "0",
                    "--out", str(corpus)], check=True, capture_output=True, timeout=300)
    losses = {}
    for graphed in ("false", "true"):
        run_dir = tmp_path / f"run_{graphed}"
        result = subprocess.run(
            [sys.executable, "train_codec.py", "--config", "tiny", "device=cuda", "dtype=float32",
             f"cuda_graph={graphed}", f"train_data_path={corpus / 'train'}", f"val_data_path={corpus / 'val'}",
             f"checkpoint_dir={run_dir}", "wandb=disabled", "max_steps=12", "disc_start_step=5", "log_interval=1",
             "eval_interval=12", "save_interval=12"],
            cwd=ROOT, env={**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}, capture_output=True, text=True,
            timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[graphed] = [(r["step"], r["loss/total"], r.get("loss/disc")) for r in rows if "loss/total" in r]
    assert [s for s, _, _ in losses["true"]] == list(range(1, 13))
    for (step, eager, eager_d), (_, graphed, graphed_d) in zip(losses["false"], losses["true"]):
        assert graphed == pytest.approx(eager, rel=2e-3), step
        assert (graphed_d is None) == (eager_d is None), step
        if eager_d is not None:
            assert graphed_d == pytest.approx(eager_d, rel=2e-3), step
