"""CUDA-graph decoding (bytelm.models.cuda_graph): replayed steps equal eager ones; models whose
state grows (attention) and CPU tensors are refused with a clear error. The equality tests need
a GPU and run in the device suite (benchmarks/gpu_suite.sh)."""

import pytest
import torch

from bytelm.models.cuda_graph import GRAPH_MIN_STEPS, GraphedStep, decode_step
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


def test_decode_step_is_eager_on_cpu_and_for_short_generations():
    model = tiny()
    ids = torch.randint(0, 256, (2, 5))
    _, states = model.prefill(ids)
    _, states_ref = model.prefill(ids)
    step = decode_step(model, states, ids[:, 0], None, 10 * GRAPH_MIN_STEPS)
    assert not isinstance(step, GraphedStep)
    torch.testing.assert_close(step(ids[:, 1]), model.step(ids[:, 1], states_ref))


@needs_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_steps_equal_eager_steps(autocast, batch):
    model = tiny("MMF").cuda()
    prompt = torch.randint(0, 256, (batch, 9), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, states = model.prefill(prompt)
        _, states_eager = model.prefill(prompt)
        ids = logits[:, :256].argmax(-1)
        graphed = GraphedStep(model, states, ids)
        for _ in range(20):
            out = graphed(ids).clone()
            ref = model.step(ids, states_eager)
            # the same kernels on the same inputs; allow only cuBLAS picking another algorithm
            tol = 1e-3 if autocast else 1e-5
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
            ids = (ids * 7 + 3) % 256  # any next ids: the graph must read the new ones
    for s, e in zip(states, states_eager):
        if s is not None:
            torch.testing.assert_close(s.ssm, e.ssm, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(s.conv, e.conv, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_generate_with_and_without_graph_gives_the_same_bytes():
    model = tiny("MMF").cuda()
    prompt = torch.randint(0, 256, (2, 17), device="cuda")
    runs = [torch.stack(list(generate(model, prompt, 3 * GRAPH_MIN_STEPS, temperature=0,
                                      cuda_graph=flag)), 1) for flag in (False, True)]
    assert torch.equal(runs[0], runs[1])
