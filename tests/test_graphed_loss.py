"""CUDA-graph training (bytelm.training.cuda_graph.GraphedLoss, train.cuda_graph): graphed steps
give the eager steps' losses and parameters, with gradient accumulation and either way of
zeroing gradients; misuse is a clear error. The equality tests need a GPU and run in the device
suite (benchmarks/gpu_suite.sh); the CPU checks the gradient binding and the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F

import train
from bytelm.models.lm import LM, ModelConfig
from bytelm.training.cuda_graph import GraphedLoss, bind_grads

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


def tiny(pattern="MA", device="cpu", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, layer_pattern=pattern, d_state=8, n_head=4, **kw)
    return LM(cfg).to(device)


def next_byte_loss(model):
    def loss_of(ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    return loss_of


def test_bind_grads_zeroes_missing_and_keeps_replaced_values():
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    grads = [torch.full((3,), 7.0) for _ in range(3)]
    params[0].grad = None                    # zero_grad(set_to_none=True): a zero gradient
    params[1].grad = torch.full((3,), 2.0)   # replaced: its value is kept
    params[2].grad = grads[2]                # already bound: left alone
    bind_grads(params, grads)
    assert all(p.grad is g for p, g in zip(params, grads))
    assert params[0].grad.tolist() == [0.0] * 3
    assert params[1].grad.tolist() == [2.0] * 3
    assert params[2].grad.tolist() == [7.0] * 3


def test_graphed_loss_refuses_cpu_tensors():
    model = tiny()
    graphed = GraphedLoss(next_byte_loss(model), model.parameters())
    with pytest.raises(ValueError, match="needs the batch and the parameters on a CUDA device"):
        graphed(torch.randint(0, 256, (2, 9)))


def test_graphed_loss_without_grad_runs_eagerly():
    model = tiny()
    graphed = GraphedLoss(next_byte_loss(model), model.parameters())
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(graphed(ids), next_byte_loss(model)(ids))
    assert not graphed.captured


def test_graphed_loss_needs_a_trainable_parameter():
    with pytest.raises(ValueError, match="no parameter requires grad"):
        GraphedLoss(lambda ids: ids.sum(), [torch.zeros(2)])


class FakeGraph:
    """Stands in for a CUDA graph on the CPU: replay() runs the recorded Python."""

    def __init__(self, fn):
        self.replay = fn


def fake_captured(model, batch_shape):
    """A GraphedLoss whose "graphs" compute eagerly what the captured ones would: the loss into
    the static loss, the gradients added into the bound .grad tensors. It exercises everything
    around the capture (the autograd Function, gradient binding, the move check) on a CPU."""
    loss_fn = next_byte_loss(model)
    graphed = GraphedLoss(loss_fn, model.parameters())
    params, live = graphed.params, {}
    graphed._batch = torch.zeros(batch_shape, dtype=torch.long)
    graphed._grads = [torch.zeros_like(p) for p in params]
    bind_grads(params, graphed._grads)
    graphed._loss, graphed._grad_out = torch.zeros(()), torch.ones(())

    def forward():
        with torch.enable_grad():  # autograd.Function.forward runs without grad
            live["loss"] = loss_fn(graphed._batch)
        graphed._loss.copy_(live["loss"].detach())

    def backward():
        grads = torch.autograd.grad(live.pop("loss"), params, graphed._grad_out, allow_unused=True)
        torch._foreach_add_([a for a, g in zip(graphed._grads, grads) if g is not None],
                            [g for g in grads if g is not None])

    graphed._fwd, graphed._bwd = FakeGraph(forward), FakeGraph(backward)
    graphed._captured_at = graphed._addresses()
    return graphed


def cpu_steps(model, loss_of, batches, accum, zero):
    """SGD steps, each over `accum` micro-batches; zero: "none", "zeros" or "guard" (the
    NumericalGuard's skip: .grad set to None after the step's backward, no update)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for i, ids in enumerate(batches):
        for micro in ids.chunk(accum):
            loss = loss_of(micro) / accum
            loss.backward()
            losses.append(loss.item())
        if zero == "guard" and i == 1:
            for p in model.parameters():
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=zero != "zeros")
    return losses


@pytest.mark.parametrize("accum, zero", [(1, "none"), (3, "none"), (2, "zeros"), (2, "guard")])
def test_graphed_loss_logic_matches_eager_on_the_cpu(accum, zero):
    eager = tiny("MA")
    graphed = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 256, (2 * accum, 24), generator=g) for _ in range(4)]
    want = cpu_steps(eager, next_byte_loss(eager), batches, accum, zero)
    got = cpu_steps(graphed, fake_captured(graphed, (2, 24)), batches, accum, zero)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want))
    for a, b in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b)


def test_a_stale_backward_is_refused_on_the_cpu():
    model = tiny("MA")
    graphed = fake_captured(model, (2, 17))
    ids = torch.randint(0, 256, (2, 17))
    first = graphed(ids)
    graphed(ids).backward()
    with pytest.raises(RuntimeError, match="older call's loss"):
        first.backward()


def test_a_moved_model_drops_its_graphs():
    model = tiny("MA")
    graphed = fake_captured(model, (2, 17))
    model.double()  # the same tensor objects with new storage: the graphs' addresses are stale
    with pytest.raises(ValueError, match="on a CUDA device"):  # here: captured again, on the CPU
        graphed(torch.randint(0, 256, (2, 17)))
    assert not graphed.captured


@pytest.mark.parametrize("extra, message", [
    (["--train.compile", "true"], "train.cuda_graph and train.compile: choose one"),
    (["--trainer.strategy", "ddp", "--trainer.devices", "2"], "got trainer.strategy ddp on 2 device(s)"),
    (["--trainer.strategy", "ddp", "--trainer.devices", "1"], "got trainer.strategy ddp on 1 device(s)"),
    ([], "train.cuda_graph needs a CUDA GPU; the trainer runs on cpu"),
])
def test_train_refuses_cuda_graph_where_it_cannot_run(tmp_path, capsys, extra, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = ["--data", str(corpus), "--name", "graphed", "--train.out_dir", str(tmp_path / "runs"),
            "--data.prepared_dir", str(tmp_path / "prepared"), "--data.seq_len", "32",
            "--data.batch_size", "4", "--data.val_bytes", "1024", "--model.d_model", "32",
            "--model.n_layer", "2", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
            "--train.cuda_graph", "true", *extra]
    assert train.main(args) == 2
    # Lightning's INFO lines come first: the error is the last line, and the only one
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "runs" / "graphed").exists()  # refused before anything was written


def train_steps(model, loss_of, batches, accum, set_to_none):
    """Fused AdamW steps over `batches` (each cut into `accum` micro-batches); the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    losses = []
    for ids in batches:
        for micro in ids.chunk(accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(micro) / accum
            loss.backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return losses


@needs_cuda
@pytest.mark.parametrize("pattern", ["MA", "AF"])
@pytest.mark.parametrize("accum, set_to_none", [(1, True), (2, True), (3, False)])
def test_graphed_training_matches_eager(pattern, accum, set_to_none):
    eager = tiny(pattern, "cuda")
    graphed = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (3 * accum, 64), generator=g).cuda() for _ in range(4)]
    want = train_steps(eager, next_byte_loss(eager), batches, accum, set_to_none)
    graphed_loss = GraphedLoss(next_byte_loss(graphed), graphed.parameters())
    got = train_steps(graphed, graphed_loss, batches, accum, set_to_none)
    assert graphed_loss.captured
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=2e-3)
    for (name, a), b in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=name)


@needs_cuda
def test_graphed_loss_runs_another_shape_eagerly_into_the_same_grads():
    model = tiny("MA", "cuda")
    graphed = GraphedLoss(next_byte_loss(model), model.parameters())
    big, small = (torch.randint(0, 256, (4, 33), device="cuda"),
                  torch.randint(0, 256, (2, 17), device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        graphed(big).backward()
        with pytest.warns(UserWarning, match="runs eagerly"):
            graphed(small).backward()
    got = [p.grad.clone() for p in model.parameters()]
    reference = tiny("MA", "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        next_byte_loss(reference)(big).backward()
        next_byte_loss(reference)(small).backward()
    for a, b in zip(got, reference.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=2e-3, atol=2e-3)


@needs_cuda
def test_a_model_moved_after_capture_is_captured_again():
    eager = tiny("MA", "cuda")
    graphed = copy.deepcopy(eager)
    loss_of = GraphedLoss(next_byte_loss(graphed), graphed.parameters())
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 256, (4, 48), generator=g).cuda() for _ in range(2)]
    want = train_steps(eager, next_byte_loss(eager), batches, 1, True)
    got = train_steps(graphed, loss_of, batches[:1], 1, True)
    before = loss_of._fwd
    graphed.cpu()  # Lightning does this at the end of every fit; new storage on the way back
    graphed.cuda()
    opt_state_lost = train_steps(graphed, loss_of, batches[1:], 1, True)  # a fresh AdamW
    assert loss_of.captured and loss_of._fwd is not before
    torch.testing.assert_close(got[0], want[0], rtol=2e-3, atol=2e-3)
    # the second step's loss comes before any update: it must see the first step's weights
    torch.testing.assert_close(opt_state_lost[0], want[1], rtol=2e-3, atol=2e-3)


@needs_cuda
def test_graphed_loss_refuses_a_stale_backward():
    model = tiny("MA", "cuda")
    graphed = GraphedLoss(next_byte_loss(model), model.parameters())
    ids = torch.randint(0, 256, (2, 33), device="cuda")
    first = graphed(ids)
    graphed(ids)
    with pytest.raises(RuntimeError, match="older call's loss"):
        first.backward()


@needs_cuda
def test_graphed_dropout_draws_fresh_masks():
    model = tiny("MA", "cuda", dropout=0.5)
    graphed = GraphedLoss(next_byte_loss(model), model.parameters())
    ids = torch.randint(0, 256, (2, 33), device="cuda")
    losses = []
    for _ in range(3):
        loss = graphed(ids)
        loss.backward()
        losses.append(loss.item())
    assert len(set(losses)) == 3  # the same batch, a new dropout mask each replay


@needs_cuda
def test_train_with_cuda_graph_matches_eager(tmp_path, monkeypatch):
    import bytelm.training.lm_module as lm_module

    made = []

    class Recorded(GraphedLoss):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

        def release(self):  # at the end of the fit: remember that it had captured
            self.was_captured = self.captured
            super().release()

    monkeypatch.setattr(lm_module, "GraphedLoss", Recorded)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. Pack my box. " * 300)

    def run(name, *extra):
        args = ["--data", str(corpus), "--name", name, "--train.out_dir", str(tmp_path / "runs"),
                "--data.prepared_dir", str(tmp_path / "prepared"), "--data.seq_len", "64",
                "--data.batch_size", "4", "--data.val_bytes", "2048", "--model.d_model", "32",
                "--model.n_layer", "2", "--model.d_state", "8", "--optim.lr", "1e-2",
                "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "1",
                "--trainer.accumulate_grad_batches", "2", "--trainer.gradient_clip_val", "1.0",
                "--train.eval_every", "6", "--train.ckpt_every", "6", "--train.sample_bytes", "8",
                "--trainer.enable_progress_bar", "false", *extra]
        assert train.main(args) == 0
        import csv
        with open(tmp_path / "runs" / name / "logs" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        return ([float(r["train/loss"]) for r in rows if r.get("train/loss")],
                [float(r["val/bpb"]) for r in rows if r.get("val/bpb")])

    eager_loss, eager_val = run("eager")
    assert not made
    graph_loss, graph_val = run("graphed", "--train.cuda_graph", "true")
    assert len(made) == 1 and made[0].was_captured and not made[0]._warned  # no eager steps
    assert len(graph_loss) == len(eager_loss) >= 12 and len(graph_val) == len(eager_val) == 2
    torch.testing.assert_close(torch.tensor(graph_loss), torch.tensor(eager_loss), rtol=1e-2,
                               atol=1e-2)
    torch.testing.assert_close(torch.tensor(graph_val), torch.tensor(eager_val), rtol=1e-2,
                               atol=1e-2)
