"""Eval scoring without training: bits per byte against hand computations, exact-match and
likelihood scoring against fake models whose answers are known, streaming generation, and the
seeded text perturbations."""

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bytelm import probes
from bytelm.checkpoint import ByteTokenizer
from bytelm.models.lm import sample_next
from bytelm.models.mamba_lm import MambaConfig, MambaLM
from eval import common, robustness
from eval import probes as eval_probes
from eval.generate import TextStream, generate

CPU = torch.device("cpu")


class FakeLM(nn.Module):
    """After a known prompt, strongly prefers the bytes of its continuation; uniform elsewhere.
    forward, prefill and step apply the same rule to the prefix, as a causal model would."""

    VOCAB = 264

    def __init__(self, continuations: dict[str, str]):
        super().__init__()
        self.known = [(p.encode(), c.encode()) for p, c in continuations.items()]
        self.unused = nn.Parameter(torch.zeros(()))  # a device for the scorers to read
        self.forward_calls = 0

    def _next(self, prefix: list[int]) -> torch.Tensor:
        logits = torch.zeros(self.VOCAB)
        seen = bytes(i for i in prefix if i < 256)
        for prompt, cont in self.known:
            done = len(seen) - len(prompt)
            on_track = seen[:len(prompt)] == prompt and seen[len(prompt):] == cont[:max(done, 0)]
            if on_track and 0 <= done < len(cont):
                logits[cont[done]] = 20.0
        return logits

    def forward(self, ids):
        self.forward_calls += 1
        return torch.stack([torch.stack([self._next(row[:t + 1].tolist()) for t in range(len(row))])
                            for row in ids])

    def prefill(self, ids):
        state = [row.tolist() for row in ids]
        return torch.stack([self._next(s) for s in state]), state

    def step(self, ids, state):
        for s, i in zip(state, ids.tolist()):
            s.append(i)
        return torch.stack([self._next(s) for s in state])


class ConstantLM(nn.Module):
    """The same next-id distribution at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, ids):
        return self.logits.expand(*ids.shape, -1)


class PairTokenizer:
    """A token model's tokenizer over the letters a and b: pairs are one token."""

    is_bytes = False
    pieces = ["aa", "ab", "ba", "bb", "a", "b"]
    vocab_size = len(pieces)

    def encode(self, text):
        return [self.pieces.index(text[i:i + 2]) for i in range(0, len(text), 2)]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def encode_bytes(self, data):
        return self.encode(data.decode())

    token_bytes = np.array([len(p) for p in pieces])


# ---- bits per byte ------------------------------------------------------------------------

def test_bpb_of_bytes_matches_a_hand_computation():
    torch.manual_seed(0)
    model = ConstantLM(torch.randn(264))
    logp = torch.log_softmax(model.logits.detach(), -1)
    text = "hello, world: bits per byte!"
    data = text.encode()
    hand = -sum(logp[b].item() for b in data[1:]) / math.log(2) / (len(data) - 1)
    for seq_len, batch_size in ((1, 1), (4, 3), (7, 2), (100, 8)):
        r = common.text_bpb(model, ByteTokenizer(), text, seq_len, batch_size, CPU)
        assert r["bytes"] == r["tokens"] == len(data) - 1
        assert r["bpb"] == pytest.approx(hand, rel=1e-6)


def test_bpb_counts_bytes_not_characters_when_the_text_starts_non_ascii():
    model = ConstantLM(torch.zeros(264))
    r = common.text_bpb(model, ByteTokenizer(), "é and then some text", 8, 4, CPU)
    assert r["bytes"] == len("é and then some text".encode()) - 1 == r["tokens"]


def test_bpb_of_tokens_divides_by_bytes():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5, 0.0])
    model, tok = ConstantLM(logits), PairTokenizer()
    logp = torch.log_softmax(logits, -1)
    text = "abbaab" + "bba"  # tokens ab ba ab bb a
    ids = tok.encode(text)
    hand = -sum(logp[i].item() for i in ids[1:]) / math.log(2) / (len(text) - 2)
    r = common.text_bpb(model, tok, text, 2, 4, CPU)
    assert r == pytest.approx({"bpb": hand, "nll_nats": hand * math.log(2) * 7, "bytes": 7,
                               "tokens": 4})


def test_bpb_of_a_corpus_split_streams_what_the_text_path_computes(tmp_path):
    """The byte path (memory-mapped windows) and the text path agree, batching aside."""
    from bytelm.data.dataset import PreparedCorpus
    from bytelm.data.prepare import ensure_prepared
    from eval.bpb import evaluate

    (tmp_path / "c.txt").write_text("the cat sat on the mat. " * 60)
    corpus = PreparedCorpus(ensure_prepared(str(tmp_path / "c.txt"), tmp_path / "prep",
                                            val_fraction=0.5))
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, d_state=4)).eval()
    cfg = type("Cfg", (), {"data": type("Data", (), {"seq_len": 16})})
    loaded = common.Loaded(cfg, model, ByteTokenizer(), Path("x"), None, 0, CPU)
    streamed = evaluate(loaded, corpus, "val", None, batch_size=3)
    text = common.read_split(corpus, "val", None).decode()
    assert streamed["bytes"] == corpus.split_bytes("val") - 1
    assert streamed["bpb"] == pytest.approx(
        common.text_bpb(model, ByteTokenizer(), text, 16, 5, CPU)["bpb"], rel=1e-5)
    first = evaluate(loaded, corpus, "val", 100, batch_size=3)
    assert first["bytes"] == 99


# ---- probe scoring ------------------------------------------------------------------------

def count_examples():
    words = ["strawberry", "banana", "apple", "cherry", "kiwi", "mango"]
    return [probes.build_example("count", w, c=c) for w, c in zip(words, "raeryo")]


def test_exact_match_and_ranking_score_the_fake_models_answers():
    batch = count_examples()  # answers 3 3 1 1 0 1
    wrong = {1, 4}
    known = {ex.prompt: f" {int(ex.answer) + 1 if i in wrong else ex.answer}\n"
             for i, ex in enumerate(batch)}
    model = FakeLM(known)
    r = eval_probes.score(model, ByteTokenizer(), batch, batch_size=4, device=CPU)
    assert r["n"] == 6
    assert r["exact"] == pytest.approx(4 / 6)
    assert r["ranked"] == pytest.approx(4 / 6)
    assert r["samples"][1] == {"prompt": batch[1].prompt, "answer": "3", "output": " 4"}


def test_ranking_picks_the_likeliest_multi_byte_answer():
    batch = [probes.build_example("contains", w, c="a") for w in ("banana", "kiwi", "lemon")]
    model = FakeLM({batch[0].prompt: " yes\n", batch[1].prompt: " yes\n", batch[2].prompt: " no\n"})
    r = eval_probes.score(model, ByteTokenizer(), batch, batch_size=2, device=CPU)
    assert r["ranked"] == pytest.approx(2 / 3) and r["exact"] == pytest.approx(2 / 3)


def test_greedy_answers_stop_at_newline_or_the_limit():
    model = FakeLM({"Q: a?\nA:": " yes\nQ: more", "Q: bb?\nA:": " a long answer\n"})
    answers = common.greedy_answers(model, ByteTokenizer(), ["Q: a?\nA:", "Q: bb?\nA:"],
                                    [10, 5], batch_size=8, device=CPU)
    assert answers == [" yes", " a lo"]


def test_greedy_answers_with_the_recurrent_state_match_full_forwards():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, d_state=4)).double().eval()
    tok = ByteTokenizer()
    prompts = ["Q: one\nA:", "Q: two\nA:", "Q: three\nA:"]  # two lengths: two groups
    fast = common.greedy_answers(model, tok, prompts, [4] * 3, batch_size=2, device=CPU)
    for prompt, answer in zip(prompts, fast):
        ids = tok.encode(prompt)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1, :256].argmax()))
        assert answer == tok.decode(ids[len(tok.encode(prompt)):]).split("\n")[0]


def test_probe_evaluation_is_deterministic_and_reports_both_halves():
    words = ["strawberry", "banana", "cherry", "apple", "grape", "melon", "lemon", "peach"]
    train, held = probes.split_words(words)
    assert train and held
    a = eval_probes.examples(held, "insert", 3, seed=1)
    assert a == eval_probes.examples(held, "insert", 3, seed=1)
    assert a != eval_probes.examples(held, "insert", 3, seed=2)
    assert {ex.word for ex in eval_probes.examples(held, "spell", 100, seed=1)} == set(held)
    model = FakeLM({ex.prompt: ex.continuation for ex in eval_probes.examples(held, "count", 3, 0)})
    r = eval_probes.evaluate(model, ByteTokenizer(), words, ["count", "spell"], 3, 0, 8, CPU)
    assert r["count"]["held_out"]["exact"] == 1.0 and r["count"]["held_out"]["ranked"] == 1.0
    assert r["count"]["train"]["exact"] == 0.0 and "ranked" not in r["spell"]["held_out"]


# ---- generation ---------------------------------------------------------------------------

def test_text_stream_holds_back_split_characters():
    out = io.StringIO()
    stream = TextStream(ByteTokenizer(), out)
    for b in "é!".encode():
        stream.push(b)
        if b == "é".encode()[0]:
            assert out.getvalue() == ""
    assert out.getvalue() == "é!" and stream.n_bytes == 3 and stream.n_ids == 3


def test_generate_streams_the_greedy_continuation():
    model = FakeLM({"Once": " upon a time\n"})
    loaded = common.Loaded(None, model, ByteTokenizer(), Path("fake.ckpt"), None, 0, CPU)
    out = io.StringIO()
    r = generate(loaded, "Once", max_bytes=9, temperature=0.0, top_p=1.0, seed=0, out=out)
    assert out.getvalue() == " upon a t\n" and r["text"] == " upon a t" and r["bytes"] == 9
    sampled = [generate(loaded, "Once", 20, 1.0, 0.9, seed=s, out=io.StringIO())["text"]
               for s in (0, 0, 1)]
    assert sampled[0] == sampled[1] == " upon a time\n" + sampled[0][13:]  # top-p keeps the answer
    uniform = [generate(loaded, "zzz", 20, 1.0, 1.0, seed=s, out=io.StringIO())["text"]
               for s in (0, 0, 1)]
    assert uniform[0] == uniform[1] != uniform[2]


def test_next_id_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, 1.0, 0.75, gen, 4)) for _ in range(200)}
    assert drawn == {0, 1}
    assert int(sample_next(logits, 0.0, 1.0, None, 4)) == 0


# ---- perturbations ------------------------------------------------------------------------

TEXT = "The Quick brown fox, straße & naïve café.\nSecond line of text here. " * 5


@pytest.mark.parametrize("name", robustness.PERTURBATIONS)
def test_perturbations_are_seeded(name):
    a = robustness.perturb(TEXT, name, 0.1, seed=3)
    assert a == robustness.perturb(TEXT, name, 0.1, seed=3) != TEXT
    if name != "upper_case":
        assert a != robustness.perturb(TEXT, name, 0.1, seed=4)


def test_perturbations_preserve_length_where_they_should():
    for name in ("random_case", "upper_case", "swap"):
        out = robustness.perturb(TEXT, name, 0.2, seed=0)
        assert len(out) == len(TEXT) and sorted(out.lower()) == sorted(TEXT.lower())
    assert robustness.perturb("straße", "upper_case", 0, 0) == "STRAßE"
    assert robustness.perturb(TEXT, "random_case", 0, 0).lower() == TEXT.lower()
    swapped = robustness.perturb(TEXT, "swap", 0.2, seed=0)
    assert sum(a != b for a, b in zip(swapped, TEXT)) > 10
    dropped = robustness.perturb(TEXT, "drop", 0.1, seed=0)
    repeated = robustness.perturb(TEXT, "repeat", 0.1, seed=0)
    assert 0.8 * len(TEXT) < len(dropped) < len(TEXT) < len(repeated) < 1.2 * len(TEXT)
    for name in ("drop", "repeat", "swap"):
        assert robustness.perturb(TEXT, name, 0.0, seed=0) == TEXT


def test_robustness_scores_the_perturbed_text_itself():
    torch.manual_seed(0)
    model = ConstantLM(torch.randn(264))
    cfg = type("Cfg", (), {"data": type("Data", (), {"seq_len": 8})})
    loaded = common.Loaded(cfg, model, ByteTokenizer(), Path("x"), None, 0, CPU)
    r = robustness.evaluate(loaded, TEXT, ["drop", "upper_case"], 0.1, 0, 4)
    dropped = robustness.perturb(TEXT, "drop", 0.1, 0)
    assert r["perturbations"]["drop"]["bytes"] == len(dropped.encode()) - 1
    expected = common.text_bpb(model, ByteTokenizer(), dropped, 8, 4, CPU)["bpb"]
    assert r["perturbations"]["drop"]["bpb"] == pytest.approx(expected)
    assert r["perturbations"]["upper_case"]["delta"] == pytest.approx(
        r["perturbations"]["upper_case"]["bpb"] - r["clean"]["bpb"])


# ---- command lines ------------------------------------------------------------------------

@pytest.mark.parametrize("module, argv, message", [
    ("bpb", ["--ckpt", "/no/such/run"], "no checkpoint at /no/such/run"),
    ("bpb", ["--ckpt", "x", "--max-bytes", "0"], "--max-bytes: expected a positive integer"),
    ("generate", ["--ckpt", "x"], "the following arguments are required: --prompt"),
    ("probes", ["--ckpt", "x", "--tasks", "spelling"], "unknown task 'spelling'"),
    ("robustness", ["--ckpt", "x", "--perturbations", "blur"], "unknown perturbation 'blur'"),
    ("compare", ["/no/such/run"], "/no/such/run is not a run directory"),
    ("bpb", ["--ckpt", "x", "--device", "tpu9"], "--device 'tpu9' is not a device"),
])
def test_bad_input_is_a_one_line_error(module, argv, message, capsys, tmp_path):
    import importlib

    if "x" in argv:  # a checkpoint that exists but is garbage: checks run before loading it
        argv = [str(tmp_path / "bad.ckpt") if a == "x" else a for a in argv]
        (tmp_path / "bad.ckpt").write_bytes(b"junk")
    assert importlib.import_module(f"eval.{module}").cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
