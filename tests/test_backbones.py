"""Every backbone of the layer-pattern LM: shapes, causality, incremental decoding (KV cache and
recurrent state) equal to the full forward, clear pattern errors, FLOP formulas vs counted."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bytelm.models.lm import LM, ModelConfig, generate
from bytelm.modules.attention import Attention, KVCache

PATTERNS = {"transformer": "AF", "mamba": "M", "mamba-mlp": "MF", "hybrid-3to1": "MMMA",
            "hybrid-7to1": "MMMMMMMA", "attention-only": "A"}


def tiny(pattern: str, n_layer: int = 2, **kw) -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=n_layer, layer_pattern=pattern, d_state=4, n_head=4, **kw)
    return LM(cfg).eval()


@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_shapes_causality_and_incremental_decoding(pattern):
    n_layer = 1 if len(pattern) > 4 else 2
    model = tiny(pattern, n_layer)
    assert [b.kind for b in model.layers] == list(pattern * n_layer)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(ids)
        assert full.shape == (2, 24, 264)
        changed = ids.clone()
        changed[:, 15:] = torch.randint(0, 256, (2, 9))
        other = model(changed)
        assert torch.equal(full[:, :15], other[:, :15])  # no position sees the future
        assert not torch.allclose(full[:, 15:], other[:, 15:])

        last, states = model.prefill(ids[:, :7])
        stepped = [last] + [model.step(ids[:, t], states) for t in range(7, 24)]
        scratch_states = model.init_state(2)
        scratch = [model.step(ids[:, t], scratch_states) for t in range(24)]
    torch.testing.assert_close(torch.stack(stepped, 1), full[:, 6:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(scratch, 1), full, atol=1e-5, rtol=1e-4)


def test_kv_cache_grows_in_place_and_generation_runs():
    attn = Attention(32, 4)
    cache = attn.init_state(3)
    for t in range(40):
        attn.step(torch.randn(3, 32), cache)
    assert cache.length == 40 and cache.k.shape[2] >= 40 and cache.k.shape[:2] == (3, 4)
    model = tiny("AF")
    out = list(generate(model, torch.randint(0, 256, (2, 5)), 20, temperature=0.0))
    assert len(out) == 20 and all(int(t.max()) < 256 for t in out)
    _, states = model.prefill(torch.randint(0, 256, (2, 9)))
    assert isinstance(states[0], KVCache) and states[0].length == 9 and states[1] is None


def test_rope_makes_attention_position_aware_and_relative():
    """Same keys at shifted positions: scores depend only on the distance."""
    from bytelm.ops.rotary import rotary_ref as rotary

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    score = lambda qs, ks: (rotary(q, qs, 10000.0) * rotary(k, ks, 10000.0)).sum()
    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


@pytest.mark.parametrize("pattern, message", [
    ("MMXA", "unknown layer 'X' in 'MMXA'"),
    ("", "model.layer_pattern is empty"),
])
def test_bad_pattern_is_a_one_line_error(pattern, message):
    with pytest.raises(ValueError, match=message):
        LM(ModelConfig(layer_pattern=pattern))


def test_pattern_errors_reach_the_config_as_config_errors():
    from bytelm.config import ConfigError, build_config, parse_overrides

    with pytest.raises(ConfigError, match="unknown layer 'Q'"):
        build_config(parse_overrides(["--model.layer_pattern", "MQ"]))
    with pytest.raises(ConfigError, match="n_head 3 must split d_model 64"):
        build_config(parse_overrides(["--model.layer_pattern", "AF", "--model.d_model", "64",
                                      "--model.n_head", "3"]))


def test_residual_out_projections_are_scaled_by_depth():
    """Init: every block's out_proj has std ~ 1/sqrt(3 fan_in) / sqrt(blocks) (mamba_ssm, GPT-2)."""
    shallow, deep = tiny("AF", 1), tiny("AF", 8)
    s = shallow.layers[0].mixer.out_proj.weight.std() / deep.layers[0].mixer.out_proj.weight.std()
    assert abs(s - (16 / 2) ** 0.5) < 0.3  # 2 vs 16 residual blocks; 1024 samples each


@pytest.mark.parametrize("pattern", ["AF", "M", "MF", "MMAF"])
def test_flop_formula_matches_counted_matmuls(pattern):
    """Every matmul the forward runs is in the formula's matmul part, exactly."""
    model, (b, length) = tiny(pattern), (2, 16)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 256, (b, length)))
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counted["aten.mm"] == model.matmul_flops_per_token() * b * length
    if pattern == "AF":
        # The math path multiplies the whole score matrix (q.k and p.v: 4 d L^2 per layer); the
        # formula counts the causal part only: query t sees t+1 keys, (L+1)/(2L) of it.
        n_attn = model.cfg.blocks.count("A")
        assert counted["aten.bmm"] == 4 * model.cfg.d_model * length ** 2 * b * n_attn
        extra = model.flops_per_token(length) - model.matmul_flops_per_token()
        assert extra * b * length * 2 * length == counted["aten.bmm"] * (length + 1)
    if pattern == "M":
        # The causal conv pads on the left only: exactly the `length` outputs the formula counts.
        mixer = model.layers[0].mixer
        conv = 2 * mixer.d_inner * mixer.d_conv * b * len(model.layers)
        assert counted["aten.convolution"] == conv * length


def test_flops_need_seq_len_only_with_attention():
    assert tiny("MF").flops_per_token() > 0
    with pytest.raises(ValueError, match="needs seq_len"):
        tiny("MA").flops_per_token()
    m = tiny("AF")
    assert m.flops_per_token(64) - m.flops_per_token(32) == 2 * 32 * 32 * 2  # 2 A layers


def test_dropout_only_in_training_and_checked():
    import pytest as _pytest

    from bytelm.models.lm import LM, ModelConfig

    torch.manual_seed(0)
    model = LM(ModelConfig(d_model=32, n_layer=2, layer_pattern="MF", d_state=4, dropout=0.5))
    ids = torch.randint(0, 256, (2, 12))
    model.train()
    assert not torch.equal(model(ids), model(ids))  # dropout draws differ
    model.eval()
    assert torch.equal(model(ids), model(ids))
    logits, states = model.prefill(ids)
    assert torch.allclose(logits, model(ids)[:, -1], atol=1e-5)
    with _pytest.raises(ValueError, match="model.dropout must be in"):
        LM(ModelConfig(d_model=32, n_layer=1, dropout=1.0))
