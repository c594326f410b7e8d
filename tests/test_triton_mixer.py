"""The Mamba mixer on the Triton kernels equals the mixer on the references, end to end.

The mixer hands the conv and the scan channel-last views of its linear layers' outputs (no
transposes are copied); this checks that path as a whole: outputs, the gradient of the input
and of every parameter. On CPU the kernels run in Triton's interpreter (conftest.py).
"""

import pytest
import torch

from bytelm.models.lm import LM, ModelConfig
from bytelm.modules.mamba import MambaMixer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def mixer_grads(mixer, hidden, backend):
    mixer.scan_backend = backend
    mixer.zero_grad(set_to_none=True)
    h = hidden.detach().requires_grad_()
    out = mixer(h)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in mixer.named_parameters()}
    return out.detach(), h.grad.detach(), grads


@pytest.mark.parametrize("length", [1, 13, 40])
def test_mixer_triton_equals_reference(length):
    torch.manual_seed(0)
    mixer = MambaMixer(d_model=8, d_state=4, expand=2).to(DEVICE)
    hidden = torch.randn(2, length, 8, device=DEVICE)
    out, dh, grads = mixer_grads(mixer, hidden, "triton")
    out_ref, dh_ref, grads_ref = mixer_grads(mixer, hidden, "ref")
    assert rel_err(out, out_ref) < 1e-5
    assert rel_err(dh, dh_ref) < 1e-4
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-4, name


def test_mixer_state_after_prefill_matches_reference():
    torch.manual_seed(1)
    mixer = MambaMixer(d_model=8, d_state=4, expand=2).to(DEVICE)
    hidden = torch.randn(2, 11, 8, device=DEVICE)
    with torch.no_grad():
        mixer.scan_backend = "triton"
        out, state = mixer(hidden, return_state=True)
        mixer.scan_backend = "ref"
        out_ref, state_ref = mixer(hidden, return_state=True)
    assert rel_err(out, out_ref) < 1e-5
    assert torch.equal(state.conv, state_ref.conv)
    assert rel_err(state.ssm, state_ref.ssm) < 1e-5


def test_lm_on_triton_kernels_trains_like_reference():
    """Two optimizer steps of a tiny byte LM: the same losses on either backend."""
    losses = {}
    for backend in ("triton", "ref"):
        torch.manual_seed(2)
        model = LM(ModelConfig(d_model=16, n_layer=2, d_state=4, scan_backend=backend)).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(3)).to(DEVICE)
        losses[backend] = []
        for _ in range(2):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[backend].append(loss.item())
    assert losses["triton"] == pytest.approx(losses["ref"], rel=1e-4)
