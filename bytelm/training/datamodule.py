"""Lightning data module over a prepared byte corpus, or its BPE token corpus when
data.tokenizer is bpe (bytelm.data.bpe: the tokenizer is trained on the training split).

Training batches are a pure function of (seed, micro-step, rank): the loader starts at the
micro-step the trainer has reached, so a resumed run continues the exact byte sequence and
ranks under DDP draw disjoint windows.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from bytelm.config import DataConfig
from bytelm.data.bpe import TokenCorpus, ensure_tokenized, token_dir
from bytelm.data.dataset import PreparedCorpus, iter_eval_windows, sample_batch
from bytelm.data.prepare import ensure_prepared
from bytelm.probes import ProbeMixer, corpus_words, load_words
from bytelm.tokenizer import ByteTokenizer


IGNORE = -100  # a target that is not scored (cross_entropy's ignore_index)


def default_prepared_dir(source: str, val_fraction: float = 0.1) -> Path:
    """data_cache/<source>, with the split in the name when it is not the default, so that runs
    holding out different fractions of one corpus do not replace each other's shards."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.strip("/"))[-80:]
    name = (slug or "corpus") + ("" if val_fraction == 0.1 else f"-val{val_fraction:g}")
    return Path("data_cache") / name


class TrainWindows(IterableDataset):
    """Endless micro-batches; `start()` tells where the run stands when iteration begins."""

    def __init__(self, corpus: PreparedCorpus, cfg: DataConfig, seed: int, start, rank: int,
                 world_size: int, probes: ProbeMixer | None = None):
        self.corpus, self.cfg, self.seed = corpus, cfg, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self.probes = probes

    def __iter__(self):
        step = self.start()
        while True:
            batch = sample_batch(self.corpus, "train", seq_len=self.cfg.seq_len,
                                 batch_size=self.cfg.batch_size, seed=self.seed, step=step,
                                 rank=self.rank, world_size=self.world_size)
            if self.probes is not None:
                self.probes.mix(batch, self.seed, step, self.rank)
            yield torch.from_numpy(batch)
            step += 1


class EvalWindows(IterableDataset):
    """Contiguous windows covering the validation split (or its first max_bytes), as batches of
    (windows, targets), this rank's share only, so a distributed validation scores every window
    once. Batch k of rank r holds windows k*B*W + r*B ... + B - 1 (B windows a batch, W ranks).
    A target is IGNORE past the end of the shorter last window and in a batch no window is left
    for: every rank runs as many forwards (under FSDP each one is a collective)."""

    def __init__(self, corpus, seq_len, batch_size, max_bytes, rank, world_size):
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.max_bytes, self.rank, self.world_size = max_bytes, rank, world_size

    def __iter__(self):
        per_slot, first = self.batch_size * self.world_size, self.rank * self.batch_size
        windows = iter_eval_windows(self.corpus, "val", self.seq_len, max_bytes=self.max_bytes)
        ids = targets = None
        for i, window in enumerate(windows):
            slot_index = i % per_slot
            if slot_index == 0:
                ids = np.zeros((self.batch_size, self.seq_len + 1), dtype=np.int64)
                targets = np.full((self.batch_size, self.seq_len), IGNORE, dtype=np.int64)
                rows = 0
            row = slot_index - first
            if 0 <= row < self.batch_size:  # a short window is padded: causal, nothing changes
                ids[row, :len(window)], targets[row, :len(window) - 1] = window, window[1:]
                rows = row + 1
            if slot_index == per_slot - 1:
                yield torch.from_numpy(ids[:rows]), torch.from_numpy(targets[:rows])
                ids = None
        if ids is not None:  # the last slot, part filled; at least one row to run a forward on
            rows = max(rows, 1)
            yield torch.from_numpy(ids[:rows]), torch.from_numpy(targets[:rows])


class ByteDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, seed: int, prepared_dir: str | None = None):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.prepared_dir = Path(prepared_dir or cfg.prepared_dir or default_prepared_dir(cfg.source, cfg.val_fraction))
        self.corpus: PreparedCorpus | TokenCorpus | None = None
        self.probes: ProbeMixer | None = None
        self.tokenizer = ByteTokenizer()  # a BPETokenizer once setup() opens a token corpus

    def prepare_data(self):
        ensure_prepared(self.cfg.source, self.prepared_dir, val_fraction=self.cfg.val_fraction,
                        text_column=self.cfg.text_column)
        if self.cfg.tokenizer == "bpe":
            ensure_tokenized(self.prepared_dir, self.cfg.bpe_vocab_size)

    def setup(self, stage=None):
        if self.corpus is None and self.cfg.tokenizer == "bpe":
            self.corpus = TokenCorpus(token_dir(self.prepared_dir, self.cfg.bpe_vocab_size))
            self.tokenizer = self.corpus.tokenizer
        elif self.corpus is None:
            self.corpus = PreparedCorpus(self.prepared_dir)
        if self.cfg.probe_fraction > 0 and self.probes is None:
            # Words of the text (the byte corpus), also when training reads token ids.
            words = (load_words(self.cfg.probe_words) if self.cfg.probe_words
                     else corpus_words(PreparedCorpus(self.prepared_dir)))
            self.probes = ProbeMixer(words, self.cfg.probe_fraction, encode=self.tokenizer.encode)

    def val_head(self, n_bytes: int) -> bytes:
        """The first bytes of the validation split (the default sample prompt)."""
        window = next(iter_eval_windows(self.corpus, "val", n_bytes - 1))
        return self.tokenizer.decode_bytes(window)[:n_bytes]

    @property
    def bytes_per_token(self) -> float:
        """Mean UTF-8 bytes per id of the training split (1 for bytes)."""
        return self.corpus.bytes_per_token("train") if self.cfg.tokenizer == "bpe" else 1.0

    def _rank_world(self):
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _micro_step(self) -> int:
        """Micro-batches already consumed: optimizer steps x accumulation."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.global_step * trainer.accumulate_grad_batches

    def train_dataloader(self):
        rank, world = self._rank_world()
        ds = TrainWindows(self.corpus, self.cfg, self.seed, self._micro_step, rank, world,
                          self.probes)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def val_dataloader(self):
        rank, world = self._rank_world()
        limit = self.cfg.val_bytes
        if limit is not None and self.cfg.tokenizer == "bpe":
            limit = self.corpus.tokens_covering("val", limit)  # whole tokens, at most val_bytes
        ds = EvalWindows(self.corpus, self.cfg.seq_len, self.cfg.batch_size, limit, rank, world)
        return DataLoader(ds, batch_size=None, num_workers=0)
