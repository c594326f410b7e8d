"""CUDA-graph decoding (bytelm.models.cuda_graph): replayed steps equal eager ones; models whose
state grows (attention) and CPU tensors are refused with a clear error. The equality tests need
a GPU and run in the device suite (benchmarks/gpu_suite.sh)."""

import pytest
import torch

from bytelm.models.cuda_graph import GRAPH_MIN_STEPS, GraphedStep, decode_step, use_graph
from bytelm.models.lm import LM, ModelConfig, generate

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")


def tiny(pattern="MF", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, layer_pattern=pattern, d_state=8, n_head=4, **kw)
    return LM(cfg).eval()


def test_graphed_step_refuses_a_kv_cache():
    model = tiny("AF")
    _, states = model.prefill(torch.randint(0, 256, (1, 5)))
    with pytest.raises(ValueError, match="KV cache grows"):
        GraphedStep(model, states, torch.zeros(1, dtype=torch.long))


def test_graphed_step_refuses_cpu_tensors():
    model = tiny()
    _, states = model.prefill(torch.randint(0, 256, (1, 5)))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GraphedStep(model, states, torch.zeros(1, dtype=torch.long))


@needs_cuda
def test_graphed_step_refuses_ids_of_another_shape():
    model = tiny().cuda()
    _, states = model.prefill(torch.randint(0, 256, (2, 5), device="cuda"))
    graphed = GraphedStep(model, states, torch.zeros(2, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="captured for ids of shape"):
        graphed(torch.zeros(1, dtype=torch.long, device="cuda"))


def test_use_graph_picks_cuda_models_without_attention_and_long_generations():
    mamba, hybrid = tiny("MF"), tiny("MA")
    cuda = torch.device("cuda")
    assert use_graph(None, mamba, cuda, GRAPH_MIN_STEPS)
    assert not use_graph(None, mamba, cuda, GRAPH_MIN_STEPS - 1)
    assert not use_graph(None, mamba, torch.device("cpu"), 10 * GRAPH_MIN_STEPS)
    assert not use_graph(None, hybrid, cuda, 10 * GRAPH_MIN_STEPS)
    assert not use_graph(False, mamba, cuda, 10 * GRAPH_MIN_STEPS)
    assert use_graph(True, mamba, cuda, 1)
    with pytest.raises(ValueError, match="model without attention"):
        use_graph(True, hybrid, cuda, 100)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        use_graph(True, mamba, torch.device("cpu"), 100)


def test_generate_refuses_a_graph_it_cannot_use_before_any_work():
    model = tiny()
    gen = generate(model, torch.randint(0, 256, (1, 5)), 10, cuda_graph=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        next(gen)


@pytest.mark.parametrize("n_new,n_steps", [(0, 0), (1, 0), (2, 1), (5, 4)])
def test_generate_runs_one_step_fewer_than_it_yields(monkeypatch, n_new, n_steps):
    model = tiny()
    calls = []
    step = model.step
    monkeypatch.setattr(model, "step", lambda ids, states: calls.append(1) or step(ids, states))
    out = list(generate(model, torch.randint(0, 256, (2, 5)), n_new, temperature=0))
    assert len(out) == n_new and len(calls) == n_steps


def test_eager_decode_step_is_model_step():
    model = tiny()
    ids = torch.randint(0, 256, (2, 5))
    _, states = model.prefill(ids)
    _, states_ref = model.prefill(ids)
    step = decode_step(model, states, ids[:, 0], False)
    assert not isinstance(step, GraphedStep)
    torch.testing.assert_close(step(ids[:, 1]), model.step(ids[:, 1], states_ref))


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pattern", ["MMF", "SSF"], ids=["mamba", "mamba2"])
def test_graphed_steps_equal_eager_steps(autocast, batch, pattern):
    model = tiny(pattern).cuda()
    prompt = torch.randint(0, 256, (batch, 9), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, states = model.prefill(prompt)
        _, states_eager = model.prefill(prompt)
        ids = logits[:, :256].argmax(-1)
        graphed = GraphedStep(model, states, ids)
        for _ in range(20):
            out = graphed(ids).clone()
            ref = model.step(ids, states_eager)
            # The graph replays the very kernels of an eager step on the same inputs, so the
            # logits should agree to the last bit or two (bf16: 1e-3 is ~2 ulps here).
            tol = 1e-3 if autocast else 1e-5
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
            ids = (ids * 7 + 3) % 256  # any next ids: the graph must read the new ones
    for s, e in zip(states, states_eager):
        if s is not None:
            torch.testing.assert_close(s.ssm, e.ssm, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(s.conv, e.conv, rtol=1e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("pattern", ["MMF", "SSF"], ids=["mamba", "mamba2"])
def test_generate_with_and_without_graph_gives_the_same_bytes(pattern):
    # Greedy bytes match only while the logits match to the bit (argmax near-ties): the graph
    # runs the eager step's kernels, so they do; a mismatch here means the graph went stale.
    model = tiny(pattern).cuda()
    prompt = torch.randint(0, 256, (2, 17), device="cuda")
    runs = [torch.stack(list(generate(model, prompt, 3 * GRAPH_MIN_STEPS, temperature=0,
                                      cuda_graph=flag)), 1) for flag in (False, True)]
    assert torch.equal(runs[0], runs[1])


@needs_cuda
def test_training_samples_decode_from_a_graph(monkeypatch):
    """SampleText's sample_text takes graphed steps where use_graph says they pay, and writes
    the bytes the eager steps give (greedy)."""
    import bytelm.models.cuda_graph as cg
    from bytelm.tokenizer import ByteTokenizer
    from bytelm.training.callbacks import sample_text

    made = []

    class Recorded(cg.GraphedStep):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setattr(cg, "GraphedStep", Recorded)
    model = tiny("MMF").cuda()
    model.train()
    n = 2 * GRAPH_MIN_STEPS
    text = sample_text(model, b"ROMEO:\n", n, temperature=0, seed=0)
    assert len(made) == 1 and model.training  # graphed, and the model left in training mode
    prompt = torch.tensor([list(b"ROMEO:\n")], device="cuda")
    eager = [int(t) for t in generate(model.eval(), prompt, n, temperature=0, cuda_graph=False)]
    assert text == ByteTokenizer().decode(eager)
