"""The Mamba LM: shapes, causality, recurrent step == parallel forward, init, FLOPs."""

import pytest
import torch

from bytelm import codec
from bytelm.models.mamba_lm import MambaConfig, MambaLM, generate, sample_next


def tiny(**kw):
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, d_state=8, **kw)).eval()


def test_shapes_and_padded_vocab():
    model = tiny()
    logits = model(torch.randint(0, 256, (3, 11)))
    assert logits.shape == (3, 11, 264) and codec.padded_vocab_size() == 264
    assert model.embedding.weight.shape[0] % 8 == 0


def test_causal_no_position_sees_the_future():
    model = tiny()
    ids = torch.randint(0, 256, (2, 40))
    changed = ids.clone()
    changed[:, 25:] = torch.randint(0, 256, (2, 15))
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


@pytest.mark.parametrize("prompt_len", [1, 4, 9])
def test_recurrent_step_matches_parallel_forward(prompt_len):
    model = tiny()
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(ids)
        last, states = model.prefill(ids[:, :prompt_len])
        stepped = [last] + [model.step(ids[:, t], states) for t in range(prompt_len, 20)]
        from_scratch_states = model.init_state(2)
        scratch = [model.step(ids[:, t], from_scratch_states) for t in range(20)]
    assert torch.allclose(torch.stack(stepped, 1), full[:, prompt_len - 1:], atol=1e-5)
    assert torch.allclose(torch.stack(scratch, 1), full, atol=1e-5)


def test_generation_state_is_constant_in_length():
    model = tiny()
    _, states = model.prefill(torch.randint(0, 256, (1, 5)))
    sizes = [s.conv.numel() + s.ssm.numel() for s in states]
    out = list(generate(model, torch.randint(0, 256, (1, 5)), 30, temperature=0.0))
    assert len(out) == 30 and all(int(t) < 256 for t in out)
    _, states_after = model.prefill(torch.randint(0, 256, (1, 300)))
    assert [s.conv.numel() + s.ssm.numel() for s in states_after] == sizes


def test_sampling_never_emits_specials_and_top_p_keeps_the_mode():
    logits = torch.full((4, 264), -10.0)
    logits[:, 300 - 256] = 5.0
    logits[:, 259] = 100.0  # a padded id: must never be sampled
    ids = sample_next(logits, temperature=1.0, top_p=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.all(ids == 44)
    assert torch.all(sample_next(logits, 0.0, 1.0) == 44)


def test_mamba_initialisation():
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, d_state=16, dt_min=0.001, dt_max=0.1))
    mixer = model.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.allclose(-torch.exp(mixer.A_log), -torch.arange(1, 17.0).expand(128, 16))
    assert torch.all(mixer.D == 1)


def test_flops_formula_counts_every_matmul():
    model = tiny()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.embedding.weight.numel()
    assert model.flops_per_token() > 2 * (linear + head)
    assert model.flops_per_token() < 2 * (linear + head) * 1.5
